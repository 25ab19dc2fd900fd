"""Comparison and verdict logic on made-up rows (made up here only, to test the arithmetic)."""
from moebench import aggregate
from moebench.metrics import Row


def rows_for(arm, steps, status="measured", reason=""):
    out = []
    for d, s in enumerate(steps, 1):
        out.append(Row("r", "h100_80gb", "m", arm, "bf16", "bench", "step_s", s if status == "measured" else None, "s",
                       20, 0.01 if status == "measured" else None, status, reason, "log", d))
        if status == "measured":
            out.append(Row("r", "h100_80gb", "m", arm, "bf16", "bench", "expert_lora_params", 1000, "params",
                           draw=d, source="log"))
    return out


def test_speedups_against_each_baseline_from_medians():
    rows = rows_for("hf_bf16", [1.0, 1.2]) + rows_for("unsloth_bf16", [0.5, 0.5]) + rows_for("unsloth_4bit", [5.0, 6.0])
    lines, derived = aggregate.compare(rows, ["hf_bf16", "unsloth_bf16", "unsloth_4bit"], ["hf_bf16", "unsloth_4bit"])
    by = {l["arm"]: l for l in lines}
    assert by["unsloth_bf16"]["speedup_vs_hf_bf16"] == 1.1 / 0.5
    assert by["unsloth_bf16"]["speedup_vs_unsloth_4bit"] == 5.5 / 0.5
    assert by["hf_bf16"]["draw_range_s"] == 1.2 - 1.0
    assert {r.metric for r in derived} == {"speedup_vs_hf_bf16", "speedup_vs_unsloth_4bit"}
    v = aggregate.verdict(by, 1.5)
    assert v["verdict"] == "VIABLE" and v["speedup"] == 11.0


def test_skipped_arm_has_no_number_and_verdict_not_testable():
    rows = rows_for("hf_bf16", [1.0]) + rows_for("unsloth_4bit", [None], "skipped", "needs CUDA")
    lines, derived = aggregate.compare(rows, ["hf_bf16", "unsloth_4bit"], ["hf_bf16"])
    by = {l["arm"]: l for l in lines}
    assert by["unsloth_4bit"]["status"] == "skipped" and "step_s" not in by["unsloth_4bit"]
    assert by["unsloth_4bit"]["speedup_vs_hf_bf16"] is None
    assert aggregate.verdict(by, 1.5)["verdict"] == "NOT TESTABLE"
    md = aggregate.markdown(lines, ["speedup_vs_hf_bf16"], aggregate.verdict(by, 1.5))
    assert "| unsloth_4bit | skipped |" in md and "needs CUDA" in md


def test_slow_split_lora_is_not_viable():
    rows = rows_for("unsloth_bf16", [1.0]) + rows_for("unsloth_4bit", [1.2])
    lines, _ = aggregate.compare(rows, ["unsloth_bf16", "unsloth_4bit"], ["unsloth_4bit"])
    v = aggregate.verdict({l["arm"]: l for l in lines}, 1.5)
    assert v["verdict"] == "NOT VIABLE" and abs(v["speedup"] - 1.2) < 1e-9


def test_without_unsloth_4bit_the_reference_is_a_really_4bit_arm():
    rows = rows_for("unsloth_bf16", [0.5]) + rows_for("unsloth_4bit", [None], "skipped", "needs a bnb4 checkpoint")
    for arm, step, frac in (("hf_bnb4", 1.0, 0.0), ("e4b_4bit", 4.0, 0.9)):
        rows += rows_for(arm, [step])
        rows.append(Row("r", "h100_80gb", "m", arm, "nf4", "bench", "expert_weights_4bit_fraction", frac, "fraction",
                        draw=1, source="log"))
    lines, _ = aggregate.compare(rows, ["unsloth_bf16", "unsloth_4bit", "hf_bnb4", "e4b_4bit"], [])
    v = aggregate.verdict({l["arm"]: l for l in lines}, 1.5)
    # hf_bnb4 is faster but its experts stayed bf16: it is no 4-bit reference
    assert v["reference"] == "e4b_4bit" and v["speedup"] == 8.0 and v["verdict"] == "VIABLE"
    assert "needs a bnb4 checkpoint" in v["reason"]


def test_a_long_skip_reason_is_cut_at_a_word_boundary():
    from moebench import aggregate as A

    reason = "Unsloth's 4-bit GPT-OSS class reads per-expert Linear keys, so loading " * 4
    _, why = A.four_bit_reference({"unsloth_4bit": {"arm": "unsloth_4bit", "status": "skipped", "reason": reason}})
    cut = why.split("unsloth_4bit skipped: ", 1)[1].split(";", 1)[0]
    assert cut.endswith(" …") and reason.startswith(cut[:-2]) and len(cut) <= 162 and not cut[:-2].endswith(" ")


def _env(arm, start, end, boot=None, gpu="H200"):
    host = {"hostname": "n1", "boot_id": boot, "gpu_uuid": "GPU-1" if boot else None} if boot else None
    return {"arm": arm, "started": f"2026-11-23T{start}:00+00:00", "ended": f"2026-11-23T{end}:00+00:00",
            "gpu": {"name": f"NVIDIA {gpu}"}, **({"host": host} if host else {})}


def test_draws_hours_apart_or_on_another_machine_are_separate_sessions():
    # one invocation: draws minutes apart, same machine -> one session, no note
    one = [_env("hf_bf16", "09:33", "09:35", "a"), _env("e4b_4bit", "09:35", "09:37", "a")]
    assert len(aggregate.sessions(one)) == 1 and aggregate.session_note(aggregate.sessions(one)) == ""
    # a later lease (no machine id recorded: older draws) -> split by the gap
    two = aggregate.sessions([_env("hf_bf16", "09:33", "09:35"), _env("unsloth_bf16", "16:36", "16:42"),
                              _env("unsloth_4bit", "16:32", "16:36"), _env("e4b_4bit", "09:35", "09:37")])
    assert [s["arms"] for s in two] == [["hf_bf16", "e4b_4bit"], ["unsloth_4bit", "unsloth_bf16"]]
    assert "Measured in 2 sessions" in aggregate.session_note(two)
    # minutes apart but a different machine (boot id) -> two sessions
    moved = aggregate.sessions([_env("hf_bf16", "09:33", "09:35", "a"), _env("unsloth_bf16", "09:36", "09:40", "b")])
    assert len(moved) == 2


def test_a_verdict_across_sessions_says_so():
    sess = [{"arms": ["hf_bf16", "unsloth_4bit"]}, {"arms": ["unsloth_bf16"]}]
    v = aggregate.split_by_session({"verdict": "NOT VIABLE", "reason": "r", "reference": "unsloth_4bit"}, sess)
    assert "measured in different sessions" in v["reason"] and v["sessions"] == sess
    same = aggregate.split_by_session({"verdict": "VIABLE", "reason": "r", "reference": "hf_bf16"},
                                      [{"arms": ["e4b_4bit"]}, {"arms": ["unsloth_bf16", "hf_bf16"]}])
    assert same["reason"] == "r"
    # the reference's draws split over two sessions: its median mixes them, so the ratio crosses sessions
    mixed = aggregate.split_by_session({"verdict": "VIABLE", "reason": "r", "reference": "hf_bf16"},
                                       [{"arms": ["hf_bf16"]}, {"arms": ["unsloth_bf16", "hf_bf16"]}])
    assert "different sessions" in mixed["reason"]
