from moebench.sweep import search


def fake(limit, trace):
    def probe(v):
        trace.append(v)
        return "measured" if v <= limit else "oom"
    return probe


def test_doubling_finds_power_of_two_bound():
    t = []
    ok, bad, tried = search(fake(5000, t), 1024, 65536)
    assert (ok, bad) == (4096, 8192) and t == [1024, 2048, 4096, 8192]


def test_refine_bisects_between_fit_and_oom():
    t = []
    ok, bad, _ = search(fake(5000, t), 1024, 65536, refine=3, quantum=1024)
    assert ok == 4096 and bad == 5120  # 6144 oom, 5120 oom
    assert t[-2:] == [6144, 5120]


def test_non_oom_failure_stops_without_refining():
    ok, bad, tried = search(lambda v: "measured" if v < 4 else "failed: crash", 1, 64, refine=5)
    assert (ok, bad) == (2, 4) and len(tried) == 3


def test_all_fit_up_to_limit():
    ok, bad, _ = search(lambda v: "measured", 1, 8)
    assert (ok, bad) == (8, None)


def test_first_probe_fails():
    ok, bad, _ = search(lambda v: "oom", 1024, 4096)
    assert ok is None and bad == 1024
