"""Energy meter: counter reading with a fake NVML, RAPL wrap, the sampler thread, the unavailable path on
this GPU-less VM, and the row math (gross/net J per token, never a zero for a missing number)."""
import csv
import importlib.util
import os
import statistics
import threading
import time

import pytest

from moebench import energy as E
from moebench.metrics import read_rows, write_rows

ROW = dict(run_id="t", tier="cpu", model="tiny", arm="hf_bf16", precision="bf16")


class NotSupported(Exception):
    pass


class FakeNvml:
    """Just the pynvml calls the meter makes: a scripted energy counter (mJ) and power readings (mW)."""

    NVMLError_NotSupported = NotSupported

    def __init__(self, energy_mj=None, power_mw=200_000, counter=True):
        self.energy_mj = list(energy_mj or [])
        self.power_mw, self.counter = power_mw, counter
        self.power_calls = 0

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if not self.counter:
            raise NotSupported("Not Supported")
        return self.energy_mj.pop(0)

    def nvmlDeviceGetPowerUsage(self, h):
        self.power_calls += 1
        return self.power_mw


def test_nvml_counter_delta_gives_joules():
    fake = FakeNvml(energy_mj=[5_000_000, 5_250_500], power_mw=180_000)
    with E.EnergyMeter(backend="nvml", nvml=fake, hz=100) as m:
        time.sleep(0.15)
    r = m.result
    assert r.status == "measured" and r.backend == "nvml"
    assert r.joules == pytest.approx(250.5)
    assert r.method == "nvml energy counter"
    assert r.peak_w == pytest.approx(180.0)
    assert len(r.trace) >= 3 and all(w == 180.0 for _, w in r.trace)
    assert r.mean_w == pytest.approx(250.5 / r.seconds)


def test_unsupported_counter_integrates_power_and_says_so():
    fake = FakeNvml(counter=False, power_mw=200_000)
    with E.EnergyMeter(backend="nvml", nvml=fake, hz=100) as m:
        time.sleep(0.2)
    r = m.result
    assert r.status == "measured"
    assert "integrated sampled power" in r.method and "not supported" in r.method
    span = r.trace[-1][0] - r.trace[0][0]
    assert r.joules == pytest.approx(200.0 * span)  # constant power: trapezoid is exact
    assert r.joules == pytest.approx(200.0 * r.seconds, rel=0.3)


def test_integrate_w_trapezoid():
    assert E.integrate_w([(0.0, 100.0), (1.0, 200.0), (3.0, 200.0)]) == pytest.approx(150.0 + 400.0)
    assert E.integrate_w([(0.0, 100.0)]) is None


def _write(path, text):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)  # atomic, so the sampler thread never reads a half-written counter


def _rapl_tree(root, energy, max_range=1_000_000):
    for zone in ("intel-rapl:0", "intel-rapl:0:0"):  # the sub-zone must be ignored (double count)
        d = root / zone
        d.mkdir(parents=True, exist_ok=True)
        _write(d / "energy_uj", str(energy))
        _write(d / "max_energy_range_uj", str(max_range))


def test_rapl_delta_wraps():
    assert E.rapl_delta_uj(100, 400, 1000) == 300
    assert E.rapl_delta_uj(900, 100, 1000) == 200


def test_rapl_source_unwraps_and_ignores_subzones(tmp_path):
    _rapl_tree(tmp_path, 900_000)
    src = E.RaplSource(str(tmp_path))
    assert [os.path.basename(z) for z in src.zones] == ["intel-rapl:0"]
    e0 = src.energy_j()
    _write(tmp_path / "intel-rapl:0" / "energy_uj", "100000")  # wrapped past 1_000_000
    assert src.energy_j() - e0 == pytest.approx(0.2)


def test_rapl_meter_over_a_wrap(tmp_path):
    _rapl_tree(tmp_path, 950_000)
    with E.EnergyMeter(backend="rapl", rapl_root=str(tmp_path), hz=50) as m:
        time.sleep(0.05)
        _write(tmp_path / "intel-rapl:0" / "energy_uj", "50000")
        time.sleep(0.05)
    assert m.result.status == "measured" and m.result.method == "rapl energy counter"
    assert m.result.joules == pytest.approx(0.1)


def test_sampler_stops_promptly_and_collects():
    s = E.PowerSampler(lambda: 42.0, hz=200)
    s.start(time.monotonic())
    time.sleep(0.1)
    s.stop()
    assert not s.alive
    n = len(s.samples)
    assert n >= 5 and all(w == 42.0 for _, w in s.samples)
    time.sleep(0.05)
    assert len(s.samples) == n  # nothing is appended after stop()
    assert "moebench-power" not in [t.name for t in threading.enumerate()]


def test_sampler_stop_does_not_wait_a_long_period():
    s = E.PowerSampler(lambda: 1.0, hz=0.2)  # 5 s between samples
    s.start(time.monotonic())
    t = time.monotonic()
    s.stop()
    assert time.monotonic() - t < 1.0 and not s.alive


def test_sampler_survives_a_failed_read():
    calls = iter([RuntimeError("gpu busy")] + [7.0] * 1000)

    def read():
        v = next(calls)
        if isinstance(v, Exception):
            raise v
        return v

    s = E.PowerSampler(read, hz=200)
    s.start(time.monotonic())
    time.sleep(0.05)
    s.stop()
    assert s.errors == ["gpu busy"] and len(s.samples) >= 2


def _rapl_readable():
    return bool(E._rapl_zones(E.RAPL_ROOT))


@pytest.mark.skipif(_rapl_readable(), reason="this host has a readable RAPL counter")
def test_unavailable_on_this_machine_gives_reason_not_zero(tmp_path):
    with E.EnergyMeter(backend="rapl") as m:
        pass
    r = m.result
    assert r.status == "unavailable" and r.joules is None
    assert r.reason == "no readable RAPL counter under /sys/class/powercap"
    rows = E.energy_rows(r, None, tokens=1000, **ROW)
    assert rows and all(x.status == "unavailable" and x.value is None for x in rows)
    assert all(x.stage == "energy" and x.reason for x in rows)
    assert "energy_method" not in {x.metric for x in rows}
    write_rows(tmp_path / "m.csv", rows)
    with open(tmp_path / "m.csv") as fh:
        assert all(rec["value"] == "" for rec in csv.DictReader(fh))


@pytest.mark.skipif(_rapl_readable() or E._cuda_present(), reason="host has an energy source")
def test_auto_without_gpu_names_both_reasons():
    with E.EnergyMeter(backend="auto") as m:
        pass
    assert m.result.status == "unavailable"
    assert "no CUDA GPU" in m.result.reason and "RAPL" in m.result.reason


def test_nvml_that_cannot_open_is_unavailable():
    class Broken(FakeNvml):
        def nvmlInit(self):
            raise RuntimeError("Driver Not Loaded")

    with E.EnergyMeter(backend="nvml", nvml=Broken()) as m:
        pass
    assert m.result.status == "unavailable" and "Driver Not Loaded" in m.result.reason


def _res(joules, seconds, peak=None):
    return E.EnergyResult("measured", backend="nvml", method="nvml energy counter", joules=joules,
                          seconds=seconds, peak_w=peak)


def _by_metric(rows):
    return {r.metric: r for r in rows}


def test_row_math():
    rows = _by_metric(E.energy_rows(_res(1000.0, 10.0, peak=250.0), _res(300.0, 10.0), tokens=500, **ROW))
    v = {k: r.value for k, r in rows.items()}
    assert v["energy_j"] == 1000.0
    assert v["j_per_token"] == pytest.approx(2.0)
    assert v["tokens_per_kj"] == pytest.approx(500.0)
    assert v["mean_w"] == pytest.approx(100.0)
    assert v["peak_w"] == pytest.approx(250.0)
    assert v["idle_w"] == pytest.approx(30.0)
    assert v["j_per_token_net"] == pytest.approx((1000 - 30 * 10) / 500)
    assert v["tokens_per_kj_net"] == pytest.approx(500 / 0.7)
    assert v["kwh_per_mtok"] == pytest.approx(2.0 * 1e6 / 3.6e6)
    assert v["kwh_per_mtok_net"] == pytest.approx(1.4 * 1e6 / 3.6e6)
    assert v["energy_method"] == "nvml energy counter"
    assert all(r.status == "measured" and r.stage == "energy" and r.arm == "hf_bf16" for r in rows.values())


def test_missing_numbers_are_never_zero(tmp_path):
    """No idle baseline and no power samples: those rows must be unavailable with no value (a 0 would read as
    'free'), while the gross numbers stay measured."""
    rows = _by_metric(E.energy_rows(_res(1000.0, 10.0, peak=None), None, tokens=500, **ROW))
    for m in ("j_per_token_net", "tokens_per_kj_net", "kwh_per_mtok_net", "idle_w", "peak_w"):
        assert rows[m].status == "unavailable" and rows[m].value is None and rows[m].reason, m
    assert rows["j_per_token"].value == pytest.approx(2.0)
    back = _by_metric(read_rows(write_rows(tmp_path / "m.csv", rows.values())))
    assert back["j_per_token_net"].value is None and back["idle_w"].status == "unavailable"


def test_no_tokens_or_no_energy_is_unavailable():
    for res, tokens in ((_res(1000.0, 10.0), 0), (_res(0.0, 10.0), 500)):
        rows = _by_metric(E.energy_rows(res, None, tokens=tokens, **ROW))
        assert rows["j_per_token"].status == "unavailable" and rows["j_per_token"].value is None


def test_net_below_idle_is_not_a_negative_number():
    rows = _by_metric(E.energy_rows(_res(100.0, 10.0), _res(300.0, 10.0), tokens=500, **ROW))
    assert rows["j_per_token_net"].status == "unavailable" and "idle" in rows["j_per_token_net"].reason


def test_idle_baseline_uses_same_meter():
    fake = FakeNvml(energy_mj=[0, 60_000], power_mw=60_000)
    idle = E.idle_baseline(3.0, sleep=lambda s: time.sleep(0.02), backend="nvml", nvml=fake, hz=200)
    assert idle.status == "measured" and idle.joules == pytest.approx(60.0)
    assert fake.power_calls >= 1


def test_write_trace(tmp_path):
    r = _res(10.0, 1.0)
    r.trace = [(0.0, 100.0), (0.5, 150.25)]
    p = E.write_trace(tmp_path / "trace.csv", r)
    with open(p) as fh:
        recs = list(csv.DictReader(fh))
    assert [(float(x["t_s"]), float(x["watts"])) for x in recs] == r.trace


@pytest.mark.skipif(importlib.util.find_spec("zeus") is not None, reason="zeus installed")
def test_zeus_window_optional():
    """Without zeus the work still runs and the rows say why there is no cross-check (never a zero)."""
    ran = []
    with E.ZeusWindow() as z:
        ran.append(1)
    assert ran == [1] and z.result["status"] == "unavailable" and "zeus" in z.result["reason"]
    rows = E.zeus_rows(E.EnergyResult(status="measured", joules=100.0, seconds=1.0), z.result, 10, **ROW)
    assert [(r.metric, r.status, r.value) for r in rows] == [("energy_j_zeus", "unavailable", None)]


def test_zeus_rows_relative_difference():
    ours = E.EnergyResult(status="measured", joules=200.0, seconds=2.0)
    rows = {r.metric: r.value for r in E.zeus_rows(ours, {"status": "measured", "joules": 210.0, "seconds": 2.0}, 100, **ROW)}
    assert rows == {"energy_j_zeus": 210.0, "j_per_token_zeus": 2.1, "zeus_vs_ours_rel_diff": pytest.approx(0.05)}


def _gpu():
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.skipif(not _gpu(), reason="needs a CUDA GPU with NVML")
def test_real_nvml_measures_a_busy_gpu(tmp_path):
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    idle = E.idle_baseline(1.0, backend="nvml")
    with E.EnergyMeter(backend="auto") as m:
        t = time.monotonic()
        while time.monotonic() - t < 2.0:
            a @ a
        torch.cuda.synchronize()
    r = m.result
    print(f"method={r.method} J={r.joules:.1f} s={r.seconds:.2f} mean={r.mean_w:.1f} W peak={r.peak_w} W "
          f"idle={idle.mean_w:.1f} W samples={len(r.trace)}")
    assert r.status == "measured" and r.backend == "nvml" and r.joules > 0
    assert 20 < r.mean_w < 1500 and r.peak_w >= idle.mean_w * 0.5 and len(r.trace) >= 10
    rows = {x.metric: x for x in E.energy_rows(r, idle, tokens=1000, **ROW)}
    assert rows["j_per_token"].status == "measured" and rows["j_per_token"].value > 0
    E.write_trace(tmp_path / "trace.csv", r)


# ---- conditions of a window, settling before the idle baseline
class FakeNvmlState(FakeNvml):
    """Adds the clock/limit/temperature/throttle reads; `throttle` is the reasons bitmask at each read."""

    def __init__(self, *a, throttle=(0x0, 0x4), temps=(40, 71), **k):
        super().__init__(*a, **k)
        self.throttle, self.temps = list(throttle), list(temps)

    def nvmlDeviceGetClockInfo(self, h, kind):
        return {1: 1980, 2: 3201}[kind]  # SM, memory (E.NVML_CLOCK_SM, E.NVML_CLOCK_MEM)

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 700_000

    def nvmlDeviceGetTemperature(self, h, sensor):
        return self.temps.pop(0)

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self.throttle.pop(0)


def test_throttle_names():
    assert E.throttle_names(0) == "none"
    assert E.throttle_names(0x4 | 0x40) == "sw_power_cap|hw_thermal_slowdown"
    assert E.throttle_names(0x200 | 0x1000) == "board_limit|0x1000"


def test_window_records_conditions_at_start_and_end():
    fake = FakeNvmlState(energy_mj=[0, 100_000], power_mw=300_000)
    with E.EnergyMeter(backend="nvml", nvml=fake, hz=100) as m:
        time.sleep(0.05)
    r = m.result
    assert r.state_start == {"sm_clock_mhz": 1980, "mem_clock_mhz": 3201, "power_limit_w": 700.0, "temp_c": 40,
                             "throttle": "none"}
    assert r.state_end["temp_c"] == 71 and r.state_end["throttle"] == "sw_power_cap"
    rows = _by_metric(E.energy_rows(r, None, tokens=10, **ROW))
    assert rows["gpu_temp_c_start"].value == 40 and rows["gpu_temp_c_end"].value == 71
    assert rows["gpu_throttle_end"].value == "sw_power_cap" and rows["gpu_power_limit_w_start"].value == 700.0
    assert rows["power_samples"].value == len(r.trace) >= 2 and rows["energy_window_s"].value == r.seconds


def test_a_state_nvml_refuses_is_unavailable_not_zero():
    class NoTemp(FakeNvmlState):
        def nvmlDeviceGetTemperature(self, h, sensor):
            raise NotSupported("Not Supported")

    src = E.NvmlSource(nvml=NoTemp())
    rows = _by_metric(E.state_rows("gpu", "_start", src.state(), dict(ROW, stage="energy")))
    assert rows["gpu_temp_c_start"].status == "unavailable" and rows["gpu_temp_c_start"].value is None
    assert rows["gpu_sm_clock_mhz_start"].value == 1980


class ScriptedPower:
    """A source whose power follows `watts(t)` on a fake clock that `sleep` advances: no real waiting."""

    name, device = "nvml", "gpu0"

    def __init__(self, watts):
        self.t, self.watts, self.e = 0.0, watts, 0.0

    def sleep(self, s):
        self.e += self.watts(self.t) * s
        self.t += s

    def clock(self):
        return self.t

    def power_w(self):
        return self.watts(self.t)

    def energy_j(self):
        return self.e


def test_settle_waits_for_power_to_come_down():
    src = ScriptedPower(lambda t: 60.0 + 80.0 * 0.5 ** t)  # decays from 140 W towards 60 W
    settled, waited, means = E.settle(src, tol=0.05, max_s=30, sleep=src.sleep, clock=src.clock)
    assert settled and 3 <= waited <= 10
    assert abs(means[-1] - means[-2]) / means[-1] < 0.05 and abs(means[-3] - means[-2]) / means[-2] >= 0.05


def test_settle_is_capped_and_idle_says_it_did_not_settle():
    src = ScriptedPower(lambda t: 100.0 if int(t) % 2 else 200.0)  # never settles
    idle = E.idle_baseline(2.0, sleep=src.sleep, settle_max_s=5.0, source=src, clock=src.clock, hz=1000)
    assert idle.status == "measured" and idle.settle_s >= 5.0 and "not settled within 5 s" in idle.settle_note
    rows = _by_metric(E.energy_rows(_res(1000.0, 10.0), idle, tokens=500, **ROW))
    assert rows["idle_settle_s"].value >= 5.0 and "not settled" in rows["idle_settle_s"].reason


def test_idle_after_settling_reads_the_settled_power():
    src = ScriptedPower(lambda t: 60.0 + 80.0 * 0.5 ** t)
    idle = E.idle_baseline(3.0, sleep=src.sleep, settle_max_s=30.0, source=src, clock=src.clock, hz=1000)
    assert idle.settle_note == "" and idle.mean_w == pytest.approx(60.0, abs=2.0)
    unsettled = E.idle_baseline(3.0, sleep=ScriptedPower(src.watts).sleep, source=ScriptedPower(src.watts),
                                hz=1000)
    assert unsettled.settle_s is None  # settle_max_s 0: not waited for, and recorded as such


# ---- bench level: idle before the arm's imports, J/token over the whole timed window
class ClockSource:
    """A 100 W device on the real clock, recording each read in `events` (shared with the fake arm)."""

    name, device = "nvml", "gpu0"

    def __init__(self, events):
        self.events, self.t0 = events, time.monotonic()

    def energy_j(self):
        self.events.append("energy read")
        return 100.0 * (time.monotonic() - self.t0)

    def power_w(self):
        return 100.0

    def state(self):
        return {"sm_clock_mhz": 1980, "mem_clock_mhz": 3201, "power_limit_w": 700.0, "temp_c": 45, "throttle": "none"}


def test_bench_reads_idle_before_the_arm_imports_and_counts_every_timed_token(tmp_path, monkeypatch):
    import logging

    from conftest import ROOT, tiny_workdir
    from moebench import arms, bench, harness
    from moebench import config as cfgmod

    tier = tiny_workdir(tmp_path, seq_len=32, batch=2, warmup_steps=1, warmup_max=1, timed_steps=2,
                        min_power_samples=10)
    tier["gpu"] = {"name": "fake GPU"}  # a GPU tier: the idle baseline is taken (the model still runs on CPU)
    events = []
    monkeypatch.setattr(E, "open_source", lambda *a, **k: ClockSource(events))

    class Recorded(type(arms.get("hf_bf16"))):
        def preimport(self):
            events.append("arm preimport")
            super().preimport()

    cfg = cfgmod.load(ROOT / "config" / "config.yaml")
    cfg.update(idle_baseline_s=0.1, idle_settle_max_s=0)
    ctx = harness.Ctx("r", "cpu", "tiny", "hf_bf16", "bf16", 1, str(tmp_path / "draw" / "run.log"))
    bench.run(ctx, Recorded(), cfg, tier, str(tmp_path / "model"), str(tmp_path / "data" / "train.jsonl"),
              logging.getLogger("t"), bare_loop=False)
    # the idle window opened and closed (two counter reads) before the arm imported anything
    assert events[:3] == ["energy read", "energy read", "arm preimport"]
    rows = {r.metric: r for r in ctx.rows}
    n = rows["timed_steps_used"].value
    assert rows["power_samples"].value >= 10 and n >= 2  # the window ran until it held 10 power samples
    with open(tmp_path / "draw" / "steps.csv") as fh:
        steps = list(csv.DictReader(fh))
    assert len(steps) == n and all(int(s["tokens"]) == 32 * 2 for s in steps)
    tokens = 32 * 2 * n  # seq * batch * timed steps, not one step
    assert rows["j_per_token"].value == pytest.approx(rows["energy_j"].value / tokens)
    assert rows["energy_j"].value == pytest.approx(100.0 * rows["energy_window_s"].value, rel=1e-3)
    # J/token and the window's mean throughput share one window: their product is the mean power
    assert rows["j_per_token"].value * rows["tokens_per_s_mean_window"].value == pytest.approx(100.0, rel=1e-3)
    assert rows["idle_w"].value == pytest.approx(100.0, rel=1e-3)
    assert rows["gpu_temp_c_start"].value == 45 and rows["idle_gpu_sm_clock_mhz"].value == 1980
    assert rows["warmup_steps_used"].value >= 1 and rows["frozen_timed"].value == 0.0
    assert rows["router_max_over_mean"].n == 2 and "router_drift_tv" in rows
    times, q = [float(s["seconds"]) for s in steps], max(1, int(n) // 4)  # step-time drift: last vs first quarter
    assert rows["step_s_last_over_first_quarter"].value == pytest.approx(
        statistics.median(times[-q:]) / statistics.median(times[:q]))
