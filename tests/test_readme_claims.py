"""Every H100 figure the README quotes is checked against the committed run's tables (no number drifts)."""
import csv
import re

from conftest import ROOT

RUN = ROOT / "results" / "h100-gptoss20b"


def comparison():
    return {r["arm"]: r for r in csv.DictReader((RUN / "comparison.csv").open())}


def table_rows(heading: str, width: int):
    """The cells of every Markdown table row `width` columns wide in the README section under `heading`."""
    section = (ROOT / "README.md").read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == width:
            yield cells


def readme_rows():
    for cells in table_rows("## Results so far", 7):
        if cells[0] in comparison() and cells[1] != "skipped":
            yield cells


def test_readme_table_matches_comparison_csv():
    comp, seen = comparison(), 0
    for arm, step, tps, peak, _four, _j, speed in readme_rows():
        c = comp[arm]
        assert f"{float(c['step_s']):.3f}" == step, arm
        assert f"{float(c['tokens_per_s']):.0f}" == tps, arm
        assert f"{float(c['peak_alloc_gb']):.1f}" == peak, arm
        assert f"{float(c['speedup_vs_hf_bf16']):.2f}x" == speed, arm
        seen += 1
    assert seen == 4


def test_readme_headline_ratio_is_the_verdicts():
    import json

    v = json.loads((RUN / "verdict.json").read_text())
    assert v["reference"] == "e4b_4bit" and f"{v['speedup']:.1f}x faster" in (ROOT / "README.md").read_text()


def test_readme_energy_and_draw_figures_are_in_the_metrics():
    rows = list(csv.DictReader((RUN / "metrics.csv").open()))
    text = (ROOT / "README.md").read_text()
    for arm in ("unsloth_bf16", "hf_bf16", "e4b_4bit"):
        for r in rows:
            if r["arm"] == arm and r["metric"] == "j_per_token":
                assert f"{float(r['value']):.3f}" in text, (arm, r["draw"])
    steps = [float(r["value"]) for r in rows if r["arm"] == "unsloth_bf16" and r["metric"] == "step_s"]
    assert all(f"{s:.3f} s" in text for s in steps)
    ratios = [float(r["value"]) for r in rows if r["metric"] == "harness_over_bare"]
    assert sorted(f"{x:.2f}" for x in ratios) == sorted(re.findall(r"ratio was ([0-9.]+) in one draw and ([0-9.]+)",
                                                                 text)[0])


def test_two_tier_table_matches_each_runs_comparison():
    """The families-by-tiers table: every row against the comparison.csv of the run it names."""
    seen = set()
    for cells in table_rows("## Results: three families, two tiers", 7):
        if not (ROOT / "results" / cells[0] / "comparison.csv").exists():
            continue
        run, arm, step, tps, peak, four, speed = cells
        c = {r["arm"]: r for r in csv.DictReader((ROOT / "results" / run / "comparison.csv").open())}[arm]
        assert (f"{float(c['step_s']):.3f}", f"{float(c['tokens_per_s']):.0f}", f"{float(c['peak_alloc_gb']):.1f}",
                f"{float(c['expert_4bit_fraction']):.2f}", f"{float(c['speedup_vs_hf_bf16']):.2f}x") == \
            (step, tps, peak, four, speed), (run, arm)
        seen.add(run)
    assert seen == {"h100-gptoss20b", "h200-gptoss20b", "h100-qwen3-30b-a3b", "h200-qwen3-30b-a3b", "h100-olmoe-1b-7b",
                    "h200-qwen3-30b-a3b-skew"}


def test_two_tier_verdict_ratios_are_the_runs():
    import json

    text = " ".join((ROOT / "README.md").read_text().split())
    h200 = json.loads((ROOT / "results" / "h200-gptoss20b" / "verdict.json").read_text())
    qwen = json.loads((ROOT / "results" / "h100-qwen3-30b-a3b" / "verdict.json").read_text())
    assert f"8.4x (H200)" in text and f"{h200['speedup']:.1f}" == "8.4"
    assert qwen["speed_verdict"] == "NOT VIABLE" and f"({qwen['speedup']:.2f}x on the H100)" in text
    q200 = json.loads((ROOT / "results" / "h200-qwen3-30b-a3b" / "verdict.json").read_text())
    assert q200["speed_verdict"] == "NOT VIABLE" and f"{q200['speedup']:.2f}x unsloth_4bit on the H200" in text
    # the run spans two sessions and says so; its verdict's two arms share one
    assert [len(s["arms"]) for s in q200["sessions"]] == [2, 2] and "different sessions" not in q200["reason"]


def _metric(run, arm, metric):
    rows = csv.DictReader((ROOT / "results" / run / "metrics.csv").open())
    return next(float(r["value"]) for r in rows if r["arm"] == arm and r["metric"] == metric and r["stage"] == "bench")


def test_tier_ratios_and_skew_figures_are_the_runs():
    """The H200-over-H100 ratios are the tier figure's, and the skew bullet's loads and times are the runs'."""
    text = " ".join((ROOT / "README.md").read_text().split())
    from moebench import plots

    runs = [plots.load_run(ROOT / "results" / r) for r in ("h100-qwen3-30b-a3b", "h200-qwen3-30b-a3b")]
    tiers = {tuple(r["runs"]): r["tokens_per_s_ratio"] for r in plots.tier_ratios(runs)}
    qwen = tiers[("h100-qwen3-30b-a3b", "h200-qwen3-30b-a3b")]
    assert f"unsloth_4bit only {qwen['unsloth_4bit']['ratio']:.2f}x and unsloth_bf16 " \
           f"{qwen['unsloth_bf16']['ratio']:.2f}x" in text
    plain, skew = "h200-qwen3-30b-a3b", "h200-qwen3-30b-a3b-skew"
    assert f"max/mean {_metric(plain, 'hf_bf16', 'router_max_over_mean'):.1f} to " \
           f"{_metric(skew, 'hf_bf16', 'router_max_over_mean'):.1f}" in text
    assert f"{_metric(plain, 'unsloth_bf16', 'step_s'):.3f} → {_metric(skew, 'unsloth_bf16', 'step_s'):.3f} s/step" \
        in text
    assert f"first step costs {_metric(plain, 'unsloth_bf16', 'first_step_s'):.1f} s (unsloth_bf16) and " \
           f"{_metric(plain, 'unsloth_4bit', 'first_step_s'):.1f} s (unsloth_4bit)" in text


def test_validation_table_matches_each_arms_validate_rows():
    """The training-validation table: every figure against that arm's validate/metrics.csv, the result against
    verdict.json's training judgement."""
    import json

    training = json.loads((RUN / "verdict.json").read_text())["training"]
    seen = set()
    for cells in table_rows("### Training validation", 9):
        if cells[0] not in training:
            continue
        arm, steps, rows, held, drop, grads, reload, peak, result = cells
        m = {r["metric"]: r["value"] for r in csv.DictReader((RUN / "validate" / arm / "metrics.csv").open())}
        assert steps == m["optimizer_steps"] and rows == m["packed_train_sequences"], arm
        before, after = held.split(" → ")
        assert before == f"{float(m['heldout_loss_before']):.2f}", arm
        assert after in (f"{float(m['heldout_loss_after']):.3f}", f"{float(m['heldout_loss_after']):.2f}"), arm
        assert drop == f"−{float(m['gate_loss_drop_value']):.1%}", arm
        n = int(float(m["expert_lora_tensors"]))
        assert grads == f"{round(float(m['gate_expert_grads_value']) * n)} / {n}", arm
        if "reload_trained_autocast_max_abs_diff" in m:
            assert reload == (f"{float(m['reload_logits_max_abs_diff']):.3g} "
                              f"({float(m['reload_trained_autocast_max_abs_diff']):.3g})"), arm
        else:
            assert reload == "superseded check", arm
        assert peak == f"{float(m['peak_alloc_gb']):.1f}", arm
        assert result == training[arm]["result"], arm
        seen.add(arm)
    assert seen == {"unsloth_bf16", "hf_bf16", "e4b_4bit"}


def test_olmoe_moe_outside_figures_are_the_runs():
    """The OLMoE compile-region finding: every figure the README gives is that run's, and the run says it has no
    verdict (one arm, no in-run reference)."""
    import json

    run = ROOT / "results" / "h100-olmoe-1b-7b-moe-outside"
    c = {r["arm"]: r for r in csv.DictReader((run / "comparison.csv").open())}["unsloth_bf16"]
    rows = {r["metric"]: r["value"] for r in csv.DictReader((run / "metrics.csv").open()) if r["arm"] == "unsloth_bf16"}
    text = " ".join((ROOT / "README.md").read_text().split())
    assert f"{float(rows['first_step_s']):.1f} s for its first step" in text
    assert f"median {float(c['step_s']):.3f} s/step ({float(c['tokens_per_s']):.0f} tokens/s, peak " \
           f"{float(c['peak_alloc_gb']):.1f} GB" in text
    assert json.loads((run / "verdict.json").read_text())["verdict"] == "NOT TESTABLE"
    env = json.loads((run / "arms" / "unsloth_bf16" / "draw1" / "env.json").read_text())
    assert env["env"]["UNSLOTH_BLOCK_MOE"] == "outside"  # the switch the finding is about really was set
