"""The verdict rule on made-up draws (made up here only, to test the rule): every outcome, degraded and failed
references, the interleaved order and the bootstrap."""
import pytest

from moebench import verdict as V
from moebench.verdict import Draw


def draws(arm, medians, spread=0.0, status="measured", reason="", lora=1000.0, t0=0, gap=2):
    """Draws of `arm` with the given per-draw step medians; start times interleave with the other arm's."""
    out = []
    for k, m in enumerate(medians, 1):
        steps = [m - spread, m, m + spread] if spread else [m, m, m]
        minute = t0 + (k - 1) * gap
        out.append(Draw(arm, k, steps, status, reason, f"2026-12-01T10:{minute:02d}:00+00:00", lora))
    return out


def pair(bf16, q4, **kw):
    return {"unsloth_bf16": draws("unsloth_bf16", bf16, t0=0, **kw), "unsloth_4bit": draws("unsloth_4bit", q4, t0=1)}


def test_clear_win_is_viable_with_interval_and_n():
    v = V.speed_verdict(pair([0.5, 0.52, 0.49], [2.0, 2.1, 1.95]), 1.5, reps=500)
    assert v["verdict"] == "VIABLE" and v["reference"] == "unsloth_4bit"
    assert v["n_draws"] == 3 and v["interval"][0] >= 1.5 and v["interleaved"]
    assert v["paired_min"] <= v["speedup"] <= v["paired_max"]


def test_ratio_exactly_at_the_threshold_is_viable():
    # 0.75 / 0.5 is exactly 1.5 in floating point; steps without spread give an interval of [1.5, 1.5]
    v = V.speed_verdict(pair([0.5] * 3, [0.75] * 3), 1.5, reps=200)
    assert v["interval"] == [1.5, 1.5] and v["verdict"] == "VIABLE"


def test_interval_below_is_not_viable_and_straddling_is_inconclusive():
    assert V.speed_verdict(pair([1.0] * 3, [1.2] * 3), 1.5, reps=200)["verdict"] == "NOT VIABLE"
    # paired ratios 1.2, 1.5, 1.9: the interval straddles 1.5
    v = V.speed_verdict(pair([1.0, 1.0, 1.0], [1.2, 1.5, 1.9], spread=0.05), 1.5, reps=500)
    assert v["interval"][0] < 1.5 <= v["interval"][1] and v["verdict"] == "INCONCLUSIVE"


@pytest.mark.parametrize("status,reason,word", [("skipped", "needs a bnb4 checkpoint", "skipped"),
                                                 ("failed", "OOM: CUDA out of memory", "failed"),
                                                 ("degraded", "console: MoE kernel auto-tuning failed", "degraded")])
def test_reference_that_did_not_run_cleanly_is_not_testable(status, reason, word):
    d = pair([0.5] * 3, [2.0] * 3)
    d["unsloth_4bit"] = draws("unsloth_4bit", [2.0] * 3, status=status, reason=reason, t0=1)
    v = V.speed_verdict(d, 1.5, reps=100)
    assert v["verdict"] == "NOT TESTABLE" and word in v["reason"] and reason[:20] in v["reason"]


def test_degraded_candidate_is_not_testable_unless_allowed():
    d = pair([0.5] * 3, [2.0] * 3)
    d["unsloth_bf16"][1].status, d["unsloth_bf16"][1].reason = "degraded", "console: compile fallback"
    assert V.speed_verdict(d, 1.5, reps=100)["verdict"] == "NOT TESTABLE"
    assert V.speed_verdict(d, 1.5, allow_degraded=True, reps=100)["verdict"] == "VIABLE"


def test_missing_reference_is_not_testable_and_never_substituted():
    d = pair([0.5] * 3, [2.0] * 3)
    ref = d.pop("unsloth_4bit")
    d["e4b_4bit"] = [Draw("e4b_4bit", x.draw, [4.0] * 3, started=x.started, expert_4bit_fraction=0.9) for x in ref]
    d["hf_bnb4"] = [Draw("hf_bnb4", x.draw, [1.0] * 3, started=x.started, expert_4bit_fraction=0.0) for x in ref]
    v = V.speed_verdict(d, 1.5, reps=100)
    assert v["verdict"] == "NOT TESTABLE" and v["reference"] is None and "unsloth_4bit not in this run" in v["reason"]
    side = V.beside(d)  # other 4-bit arms are shown beside, each with its own ratio and census
    assert side["e4b_4bit"]["speedup"] == 8.0 and side["hf_bnb4"]["speedup"] == 2.0
    assert side["hf_bnb4"]["expert_4bit_fraction"] == 0.0


def test_too_few_draws_is_not_testable():
    v = V.speed_verdict(pair([0.5, 0.5], [2.0, 2.0]), 1.5, min_draws=3, reps=100)
    assert v["verdict"] == "NOT TESTABLE" and "2 paired draws" in v["reason"]
    # what was measured is shown (labelled), but carries no interval and no verdict
    assert v["paired_ratios"] == [4.0, 4.0] and v["interval"] is None and "4.00x, 4.00x" in v["reason"]


def test_no_expert_lora_is_not_viable():
    v = V.speed_verdict(pair([0.5] * 3, [2.0] * 3, lora=0.0), 1.5, reps=100)
    assert v["verdict"] == "NOT VIABLE" and "no expert LoRA" in v["reason"]


def test_interleaved_order():
    d = pair([0.5] * 3, [2.0] * 3)
    assert V.interleaved(V.pairs(d["unsloth_bf16"], d["unsloth_4bit"]))
    # all bf16 draws first, then all 4-bit: drift would hit one arm only
    blocked = {"unsloth_bf16": draws("unsloth_bf16", [0.5] * 3, t0=0, gap=1),
               "unsloth_4bit": draws("unsloth_4bit", [2.0] * 3, t0=10, gap=1)}
    ps = V.pairs(blocked["unsloth_bf16"], blocked["unsloth_4bit"])
    assert not V.interleaved(ps)
    v = V.speed_verdict(blocked, 1.5, reps=100)
    assert not v["interleaved"] and "not interleaved" in v["reason"]


def test_bootstrap_is_deterministic_and_widens_with_draw_spread():
    tight = pair([0.5, 0.5, 0.5], [1.5, 1.5, 1.5], spread=0.01)
    loose = pair([0.5, 0.5, 0.5], [1.0, 1.5, 2.0], spread=0.01)
    pt, pl = (V.pairs(d["unsloth_bf16"], d["unsloth_4bit"]) for d in (tight, loose))
    assert V.bootstrap(pt, reps=300) == V.bootstrap(pt, reps=300)
    (a, b), (c, d) = V.bootstrap(pt, reps=300), V.bootstrap(pl, reps=300)
    assert a <= 3.0 <= b and (d - c) > 5 * (b - a)
    # the steps inside a draw count too: same medians, wider steps -> a wider interval
    wide = pair([0.5, 0.5, 0.5], [1.5, 1.5, 1.5], spread=0.4)
    e, f = V.bootstrap(V.pairs(wide["unsloth_bf16"], wide["unsloth_4bit"]), reps=300)
    assert (f - e) > (b - a)


def _gates(result):
    return {"status": "measured", "passed": result == "PASS",
            "gates": [{"name": "loss_drop", "passed": result == "PASS", "detail": "x"}]}


def test_training_gates_join_the_speed_verdict():
    viable = V.speed_verdict(pair([0.5] * 3, [2.0] * 3), 1.5, reps=100)
    assert V.overall_verdict(viable, {})["verdict"] == "NOT TESTABLE"  # bf16 not validated
    assert V.overall_verdict(viable, {"unsloth_bf16": _gates("PASS")})["verdict"] == "VIABLE"
    assert V.overall_verdict(viable, {"unsloth_bf16": _gates("FAIL")})["verdict"] == "NOT VIABLE"
    # the reference's fine-tune fails: it did not train what it claimed, so nothing is compared
    both = {"unsloth_bf16": _gates("PASS"), "unsloth_4bit": _gates("FAIL")}
    assert V.overall_verdict(viable, both)["verdict"] == "NOT TESTABLE"
    inconclusive = {"verdict": "INCONCLUSIVE", "reason": "r", "reference": "unsloth_4bit"}
    assert V.overall_verdict(inconclusive, {"unsloth_bf16": _gates("PASS")})["verdict"] == "INCONCLUSIVE"
