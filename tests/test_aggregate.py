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


def test_skipped_arm_has_no_number():
    rows = rows_for("hf_bf16", [1.0]) + rows_for("unsloth_4bit", [None], "skipped", "needs CUDA")
    lines, derived = aggregate.compare(rows, ["hf_bf16", "unsloth_4bit"], ["hf_bf16"])
    by = {l["arm"]: l for l in lines}
    assert by["unsloth_4bit"]["status"] == "skipped" and "step_s" not in by["unsloth_4bit"]
    assert by["unsloth_4bit"]["speedup_vs_hf_bf16"] is None
    md = aggregate.markdown(lines, ["speedup_vs_hf_bf16"], {"verdict": "NOT TESTABLE", "reason": "r"})
    assert "| unsloth_4bit | skipped |" in md and "needs CUDA" in md


def test_peak_memory_is_the_largest_draw_and_step_the_median():
    rows = rows_for("hf_bf16", [1.0, 1.1, 1.4])
    for d, gb in enumerate([40.0, 55.0, 41.0], 1):
        rows.append(Row("r", "h100_80gb", "m", "hf_bf16", "bf16", "bench", "peak_alloc_gb", gb, "GB", draw=d, source="l"))
    line = aggregate.arm_summary("hf_bf16", rows)
    assert line["peak_alloc_gb"] == 55.0 and line["step_s"] == 1.1 and line["draws"] == 3


def test_a_degraded_draw_makes_the_line_and_its_ratios_degraded():
    rows = rows_for("hf_bf16", [1.0, 1.0]) + rows_for("unsloth_bf16", [0.5, 0.5])
    rows[-2] = Row("r", "h100_80gb", "m", "unsloth_bf16", "bf16", "bench", "step_s", 0.5, "s", 20, 0.01, "degraded",
                   "console: Using default MoE kernel configurations", "log", 2)
    lines, derived = aggregate.compare(rows, ["hf_bf16", "unsloth_bf16"], ["hf_bf16"])
    line = {l["arm"]: l for l in lines}["unsloth_bf16"]
    assert line["status"] == "degraded" and "default MoE kernel" in line["reason"]
    assert [r.status for r in derived if r.arm == "unsloth_bf16"] == ["degraded"]


def test_step_times_from_steps_csv_or_the_run_log(tmp_path):
    d = tmp_path / "arms" / "unsloth_bf16" / "draw1"
    d.mkdir(parents=True)
    (d / "run.log").write_text("x timed step 1/3: 0.5012 s\nx timed step 2/3: 0.4990 s\nx timed step 3: 0.5 s\n")
    assert aggregate.step_times(d) == [0.5012, 0.499, 0.5]
    (d / "steps.csv").write_text("step,seconds,tokens\n1,0.25,8192\n2,0.26,8192\n")
    assert aggregate.step_times(d) == [0.25, 0.26]


def test_shape_says_when_a_run_overrides_its_tier_plan():
    envs = [{"arm": "a", "plan": {"seq_len": 2048, "batch": 1}}]
    sh = aggregate.shape(envs, {"plan_overrides": {"seq_len": 2048, "batch": 1}})
    assert sh["tokens_per_step"] == 2048 and sh["why"] == "(no reason given)"
    assert "overrides the tier's plan" in aggregate.shape_note(sh)
    own = aggregate.shape([{"arm": "a", "plan": {"seq_len": 4096, "batch": 2}}], {"plan_overrides": {}})
    assert "the tier's own plan" in aggregate.shape_note(own) and own["tokens_per_step"] == 8192


def test_conditions_that_differ_are_listed():
    envs = [{"arm": "hf_bf16", "conditions": {"attention": {"implementation": "sdpa"}, "optimizer": "AdamW"}},
            {"arm": "unsloth_bf16", "conditions": {"attention": {"implementation": "flex_attention"},
                                                   "optimizer": "AdamW"}}]
    note = aggregate.conditions_note(envs)
    assert "attention.implementation: hf_bf16 sdpa; unsloth_bf16 flex_attention" in note and "optimizer" not in note


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


def test_committed_qwen3_draws_turn_degraded_from_their_consoles():
    """Committed fixtures, both ways a draw's console is found: the H200 Qwen3 skew run's unsloth_bf16 draw
    (2026-11-23) kept no console.log, and its part of the queue log shows the failed per-layer compile; the
    re-measured H200 Qwen3 run's unsloth_4bit draw (sitting 5) kept its own console.log, with Unsloth's autotune
    fallback. Both turn degraded with that line; hf_bf16's draws (no fallback printed) and the re-measured
    unsloth_bf16 (both causes addressed) stay measured."""
    from pathlib import Path

    from moebench import config as cfgmod
    from moebench.harness import draw_console
    from moebench.metrics import read_many

    root = Path(__file__).resolve().parents[1]
    for run, fallback, clean in (("h200-qwen3-30b-a3b-skew", ("unsloth_bf16", "block compile failed"), ["hf_bf16"]),
                                 ("h200-qwen3-30b-a3b", ("unsloth_4bit", "auto-tuning failed"),
                                  ["hf_bf16", "unsloth_bf16"])):
        r = root / "results" / run
        dirs = [r / "arms" / arm / "draw1" for arm in (fallback[0], *clean)]
        assert fallback[1] in draw_console(dirs[0])
        cfg = cfgmod.load(str(r / "config.yaml"))
        rows = aggregate.console_degraded(read_many([str(d / "metrics.csv") for d in dirs]), dirs, cfg)
        step = {x.arm: x for x in rows if x.metric == "step_s"}
        assert step[fallback[0]].status == "degraded" and fallback[1] in step[fallback[0]].reason, run
        assert all(step[a].status == "measured" for a in clean), run


def test_validation_note_names_shape_length_and_sitting():
    from moebench.aggregate import validation_note
    doc = {"passed": True, "settings": {"steps": 100, "grad_accum": 4, "batch": 2, "seq_len": 4096},
           "environment": {"gpu": {"name": "NVIDIA H200"}, "started": "2026-12-02T02:21:59"},
           "gates": [{"name": "heldout_drop", "detail": "held-out loss 12.9 -> 0.31: fell 97.6%"}]}
    note = validation_note({"unsloth_4bit": doc, "unsloth_bf16": {**doc, "passed": False}})
    assert "unsloth_4bit: PASS, TRL SFT 100 steps x 4 micro-batches of 2 x 4096 tokens; held-out loss 12.9 -> 0.31; " \
           "NVIDIA H200, 2026-12-02" in note and "unsloth_bf16: FAIL" in note
    assert validation_note({}) == ""


def test_model_record_rows_are_the_calibration_and_the_audit_derives_them_again(tmp_path):
    """The tier run's balanced build (committed): its calibration record becomes `model` rows sourced from
    model.sha256, which the audit re-derives from the same file; a raw build has none."""
    import json
    from pathlib import Path

    from moebench import router_calibration
    from moebench.audit.logs import parse_log
    from moebench.audit.levels import Findings
    from moebench.ids import row_id

    root = Path(__file__).resolve().parents[1]
    sha = root / "results/h200-gptoss20b-tier/model.sha256"
    cal = json.loads(sha.read_text())["routing"]["calibration"]
    rows = {r.metric: r for r in router_calibration.record_rows(
        str(sha), "h200-gptoss20b-tier", "h200_141gb", "gpt-oss-20b", source="results/h200-gptoss20b-tier/model.sha256")}
    assert rows["router_heldout_max_over_mean_after"].value == cal["max_over_mean"]
    assert rows["router_target_reached"].value == 0.0 and rows["router_uniform_floor"].value == cal["uniform_floor"]
    assert all(r.stage == "model" and r.arm == "all" and r.n == len(cal["layers"]) for r in rows.values())
    audited = parse_log(sha, Findings())
    assert {row_id(r): r for r in rows.values()} == audited
    raw = root / "results/h200-qwen3-30b-a3b/model.sha256"  # raw routers: nothing was fitted
    assert router_calibration.record_rows(str(raw), "r", "t", "m") == []
