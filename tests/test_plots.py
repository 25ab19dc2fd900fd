"""The report package draws measured rows only: gaps carry reasons, degraded rows are drawn as such, medians match
the rows, captions cite provenance.json's ids, and every figure is readable at the report's size.

All values below are made up for the tests (never results).
"""
from __future__ import annotations

import json
import statistics

import pytest
from PIL import Image

from moebench.report import draw, pages, runs, tables
from moebench.report.figures import FIGURES
from moebench.io import write_json
from moebench.metrics import Row, write_rows

GPU_TPS = {"hf_bf16": [1000.0, 1040.0], "hf_bnb4": [400.0, 420.0], "unsloth_bf16": [3000.0, 3100.0],
           "unsloth_4bit": [1500.0, 1450.0]}
SKIP_REASON = "experts4bit-qlora needs a CUDA card with compute capability >= 8.0"


def _r(run, arm, stage, metric, value=None, unit="", draw=None, status="measured", reason="", **kw):
    prec = "nf4" if ("4" in arm) else "bf16"
    return Row(run, "h100", "gpt-oss-20b", arm, prec, stage, metric, value, unit, status=status, reason=reason,
               draw=draw, source=f"results/{run}/arms/{arm}/draw{draw}/run.log", **kw)


def write_fixture(root, run="fx-gpu", gpu=True, energy=True, loss=True):
    """A made-up run directory in the results layout: one skipped arm, offload and energy rows, loss curves."""
    d = root / run
    rows = []
    for arm, tps in GPU_TPS.items():
        for k, t in enumerate(tps):
            mem = "peak_alloc_gb" if gpu else "peak_rss_gb"
            rows += [_r(run, arm, "bench", "tokens_per_s", t, "tokens/s", k, n=20),
                     _r(run, arm, "bench", "step_s", 4096 / t, "s", k, n=20, spread=0.01),
                     _r(run, arm, "bench", mem, 30.0 + 10 * ("bf16" in arm) + k, "GB", k)]
    rows.append(_r(run, "e4b_4bit", "bench", "step_s", status="skipped", reason=SKIP_REASON, draw=0))
    for arm in GPU_TPS:
        if arm != "hf_bf16":
            base, mine = statistics.median(4096 / t for t in GPU_TPS["hf_bf16"]), \
                statistics.median(4096 / t for t in GPU_TPS[arm])
            rows.append(_r(run, arm, "compare", "speedup_vs_hf_bf16", base / mine, "x"))
    rows += [_r(run, "hf_bf16+expert_offload", "offload", "tokens_per_s", 300.0, "tokens/s", 0),
             _r(run, "hf_bf16+expert_offload", "offload", "peak_alloc_gb", 12.0, "GB", 0),
             _r(run, "unsloth_bf16+expert_offload", "offload", "tokens_per_s", status="failed",
                reason="OOM at step 1", draw=0)]
    if energy:
        rows += [_r(run, "hf_bf16", "energy", "j_per_token", 0.5, "J/token", 0),
                 _r(run, "hf_bf16", "energy", "j_per_token_net", 0.4, "J/token", 0),
                 _r(run, "unsloth_bf16", "energy", "j_per_token", status="unavailable", reason="NVML energy "
                    "counter not supported", draw=0)]
    for w, label in ((1, "raw"), (2, "calibrated"), (3, "raw"), (4, "calibrated")):  # routing A/B windows
        rows += [_r(run, "unsloth_bf16", "routing_ab", f"w{w}_{label}_step_s", 0.9 if label == "raw" else 0.8, "s"),
                 _r(run, "unsloth_bf16", "routing_ab", f"w{w}_{label}_router_max_over_mean",
                    4.0 if label == "raw" else 1.3, "ratio")]
    rows.append(_r(run, "hf_bf16", "routing_ab", "calibrated_over_raw_step_s", status="skipped",
                   reason="raw and calibrated routers are identical"))
    rows += [_r(run, "all", "model", "router_heldout_max_over_mean_after", 1.3, "ratio"),  # the build's calibration
             _r(run, "all", "model", "router_uniform_floor", 1.1, "ratio")]
    rows += [_r(run, "hf_bf16", "validate", "gate_loss_decreases", 1.0, "bool"),
             _r(run, "unsloth_bf16", "validate", "gate_loss_decreases", status="skipped", reason="no GPU")]
    write_rows(d / "metrics.csv", rows)
    tier = {"tier": "h100" if gpu else "cpu", "host": {"cores": 2},
            "gpu": {"name": "NVIDIA H100 80GB HBM3", "memory_gb": 79.2} if gpu else None, "plan": {}}
    write_json(d / "tier.json", tier)
    write_json(d / "verdict.json", {"verdict": "VIABLE", "reason": "made-up fixture verdict", "speedup": 2.07})
    if loss:
        for arm in ("hf_bf16", "unsloth_bf16"):
            (d / "validate" / arm).mkdir(parents=True)
            (d / "validate" / arm / "loss.csv").write_text("step,loss\n" + "".join(
                f"{i},{5 - 0.1 * i}\n" for i in range(20)))
    return d


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    d = write_fixture(tmp_path_factory.mktemp("gpu"))
    pages.render_run(d, d / "plots")
    return d


def _side(d, name):
    return json.loads((d / "plots" / f"{name}.json").read_text())


def test_every_view_written_and_readable(gpu_run):
    for name in list(FIGURES):
        img = Image.open(gpu_run / "plots" / f"{name}.png")
        assert img.size[0] > 400 and img.size[1] > 300
        assert (gpu_run / "plots" / f"{name}.caption.rst").read_text().strip()
    for name in ["gates", "metrics"]:
        assert "<table>" in (gpu_run / "plots" / f"{name}.html").read_text()


def test_throughput_medians_and_ids(gpu_run):
    by_arm = {s["arm"]: s for s in _side(gpu_run, "throughput")["series"]}
    for arm, tps in GPU_TPS.items():
        assert by_arm[arm]["median"] == pytest.approx(statistics.median(tps))
        assert [p["id"] for p in by_arm[arm]["points"]] == [f"fx-gpu/bench/{arm}/d{k}/tokens_per_s"
                                                           for k in range(len(tps))]
    cap = (gpu_run / "plots" / "throughput.caption.rst").read_text()
    assert "fx-gpu/bench/unsloth_bf16/d1/tokens_per_s" in cap and "3050" in cap


def test_routing_ab_windows_are_points_and_a_skipped_arm_a_gap(gpu_run):
    side = _side(gpu_run, "routing")
    assert [(p["window"], p["routers"], p["load"]) for p in side["points"]] == [
        (1, "raw", 4.0), (2, "calibrated", 1.3), (3, "raw", 4.0), (4, "calibrated", 1.3)]
    assert side["points"][0]["ids"] == ["fx-gpu/routing_ab/unsloth_bf16/all/w1_raw_step_s",
                                        "fx-gpu/routing_ab/unsloth_bf16/all/w1_raw_router_max_over_mean"]
    assert side["gaps"] == ["hf_bf16: skipped: raw and calibrated routers are identical"]
    cap = (gpu_run / "plots" / "routing.caption.rst").read_text()
    assert "w4_calibrated_step_s" in cap
    # the build's calibrated load, with its provenance id: what the run's draws start from
    assert [(b["label"], b["value"]) for b in side["build"]] == [("held-out max/mean, saved routers", 1.3),
                                                                ("a uniform router's floor", 1.1)]
    assert "fx-gpu/model/all/all/router_heldout_max_over_mean_after" in cap


def test_skipped_arm_is_a_gap_with_reason_not_a_zero(tmp_path):
    d = write_fixture(tmp_path)
    run = runs.load_run(d)
    ss = runs.series(run, "bench", "tokens_per_s", runs.stage_arms(run, "bench"))
    fig, (ax,) = draw.figure()
    notes = []
    draw.dotbar(ax, ss, "tokens/s", "tokens/s", notes)
    heights = [p.get_height() for p in ax.patches if p.get_height() == p.get_height()]  # drop NaN slots
    assert len(heights) == len(GPU_TPS) and min(heights) > 0  # one bar per measured arm, none for e4b_4bit
    assert any("e4b_4bit" in n and SKIP_REASON in n for n in notes)
    gap = next(s for s in ss if s.arm == "e4b_4bit")
    assert gap.median is None and gap.gap == f"skipped: {SKIP_REASON}"
    assert SKIP_REASON in tables.series_caption("fx-gpu", "t", ss)


def test_speedup_uses_compare_rows_and_gaps(gpu_run):
    sp = _side(gpu_run, "speedup")["baselines"]
    us = next(s for s in sp["hf_bf16"] if s["arm"] == "unsloth_bf16")
    step = {a: statistics.median(4096 / t for t in tps) for a, tps in GPU_TPS.items()}
    assert us["median"] == pytest.approx(step["hf_bf16"] / step["unsloth_bf16"])
    assert us["median_from"] == ["fx-gpu/compare/unsloth_bf16/all/speedup_vs_hf_bf16"]
    # no compare row against unsloth_4bit in the fixture: computed from medians and says so
    hb = next(s for s in sp["unsloth_4bit"] if s["arm"] == "hf_bf16")
    assert hb["median"] == pytest.approx(step["unsloth_4bit"] / step["hf_bf16"]) and hb["how"].startswith("computed here")
    assert next(s for s in sp["hf_bf16"] if s["arm"] == "e4b_4bit")["gap"].startswith("skipped")


def test_memory_card_line_in_gb(gpu_run):
    m = _side(gpu_run, "memory")
    assert m["metric"] == "peak_alloc_gb"
    assert m["card_gb"] == pytest.approx(79.2 * 2**30 / 1e9)


def test_frontier_offload_modes(gpu_run):
    f = _side(gpu_run, "frontier")
    modes = {(p["arm"], p["mode"]) for p in f["points"]}
    assert ("hf_bf16", "expert_offload") in modes and ("hf_bf16", "resident") in modes
    assert any("unsloth_bf16+expert_offload" in g and "OOM" in g for g in f["gaps"])


def test_empty_run_still_renders_and_says_why(tmp_path):
    d = tmp_path / "cpu-empty"
    write_rows(d / "metrics.csv", [Row("cpu-empty", "cpu", "m", a, "bf16", "bench", "step_s", status="skipped",
                                       reason=f"{a} needs CUDA") for a in runs.ARM_ORDER])
    pages.render_run(d, d / "plots")
    assert all(s["median"] is None for s in _side(d, "throughput")["series"])
    assert "needs CUDA" in (d / "plots" / "throughput.caption.rst").read_text()
    assert _side(d, "loss")["curves"] == {}
    assert _side(d, "memory")["card_gb"] is None
    fig, (ax,) = draw.figure()
    draw.dotbar(ax, runs.series(runs.load_run(d), "bench", "tokens_per_s", ["hf_bf16"]), "y", "tokens/s", [])
    assert "no measured rows for tokens/s" in " ".join(t.get_text() for t in ax.texts)
    assert not ax.patches


def test_cpu_memory_falls_back_to_rss(tmp_path):
    d = write_fixture(tmp_path, run="fx-cpu", gpu=False, energy=False, loss=False)
    pages.render_run(d, d / "plots")
    m = _side(d, "memory")
    assert m["metric"] == "peak_rss_gb" and m["card_gb"] is None
    e = _side(d, "energy")["series"]["j_per_token"]
    assert all(s["median"] is None and s["gap"] for s in e)


def test_tiers_and_summary(tmp_path):
    a, b = write_fixture(tmp_path), write_fixture(tmp_path, run="fx-cpu", gpu=False)
    pages.render_runs([a, b], tmp_path / "_report")
    t = json.loads((tmp_path / "_report" / "tiers.json").read_text())
    assert {bar["run"].split()[0] for bar in t["bars"]} == {"fx-gpu", "fx-cpu"}
    s = (tmp_path / "_report" / "summary.rst").read_text()
    assert "**VIABLE**" in s and "fx-cpu" in s


def _on_tier(tmp_path, run, tier, skew=0.0):
    d = write_fixture(tmp_path, run=run)
    write_json(d / "tier.json", {**json.loads((d / "tier.json").read_text()), "tier": tier})
    (d / "config.yaml").write_text(f"model: {{name: gpt-oss-20b, routing_skew: {skew}}}\n")
    return d


def test_tier_ratios_pair_only_runs_of_one_setting(tmp_path):
    a, b = _on_tier(tmp_path, "fx-h100", "h100_80gb"), _on_tier(tmp_path, "fx-h200", "h200_141gb")
    skewed = _on_tier(tmp_path, "fx-h200-skew", "h200_141gb", skew=1.0)
    pages.render_runs([skewed, b, a], tmp_path / "_report")
    t = json.loads((tmp_path / "_report" / "tiers.json").read_text())
    # one pair: the skewed run shares neither setting nor (with fx-h200) tier; older tier name first
    assert [r["runs"] for r in t["ratios"]] == [["fx-h100", "fx-h200"]]
    assert t["ratios"][0]["tokens_per_s_ratio"]["hf_bf16"]["ratio"] == pytest.approx(1.0)
    assert "fx-h200 over fx-h100" in (tmp_path / "_report" / "tiers.caption.rst").read_text()
    # the CPU fixture has no model rows of another shape here: all three GPU runs share one panel
    assert list(t["groups"].values()) == [["fx-h200-skew", "fx-h200", "fx-h100"]]


def test_provenance_page_states_status(tmp_path):
    d = write_fixture(tmp_path)
    pages.provenance_page(d, d / "report")
    assert "absent" in (d / "report" / "provenance.html").read_text()
    write_json(d / "provenance_stamp.json", {"status": "pending", "calendars": ["a"]})
    pages.provenance_page(d, d / "report")
    assert "Stamp status: pending" in (d / "report" / "provenance.html").read_text()
    assert "ots verify results/fx-gpu/provenance.json.ots" in (d / "report" / "provenance.html").read_text()


def test_captions_are_valid_rst(gpu_run):
    from docutils.core import publish_parts
    for f in (gpu_run / "plots").glob("*.caption.rst"):
        out = publish_parts(f.read_text(), writer_name="html", settings_overrides={"halt_level": 2})["body"]
        assert "System Message" not in out, f.name


def test_degraded_rows_are_hatched_and_labelled_never_plain(tmp_path):
    """A value measured on an announced fallback path: its bar is hatched, labelled `degraded`, and the caption and
    sidecar say so."""
    d = write_fixture(tmp_path)
    rows = [r for r in runs.read_rows(d / "metrics.csv")]
    for r in rows:
        if r.arm == "hf_bnb4" and r.stage == "bench":
            r.status, r.reason = "degraded", "bitsandbytes: falling back to the slow path"
    write_rows(d / "metrics.csv", rows)
    run = runs.load_run(d)
    ss = runs.series(run, "bench", "tokens_per_s", runs.stage_arms(run, "bench"))
    fig, (ax,) = draw.figure()
    notes = []
    draw.dotbar(ax, ss, "tokens/s", "tokens/s", notes)
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == 1 and hatched[0].get_height() == pytest.approx(statistics.median(GPU_TPS["hf_bnb4"]))
    assert any("degraded" in t.get_text() for t in ax.texts) and any("slow path" in n for n in notes)
    pages.render_run(d, d / "plots")
    s = next(x for x in _side(d, "throughput")["series"] if x["arm"] == "hf_bnb4")
    assert s["degraded"].startswith("degraded:") and all(p["status"] == "degraded" for p in s["points"])
    assert "**(degraded)**" in (d / "plots" / "throughput.caption.rst").read_text()


def test_every_figure_fits_the_report(gpu_run, tmp_path):
    """Aspect between 1:3 and 3:1, at most 1300 px wide (shown near full size in the report's ~1000 px panel at a
    1400 px window; test_report measures it there), every text >= 9 pt at 100 dpi."""
    pages.render_runs([gpu_run, write_fixture(tmp_path / "b", run="fx-cpu", gpu=False)], tmp_path / "_report")
    sides = [_side(gpu_run, n) for n in FIGURES] + [json.loads((tmp_path / "_report" / "tiers.json").read_text())]
    for side in sides:
        r = side["render"]
        assert 1 / 3 <= r["width_px"] / r["height_px"] <= 3, r
        assert r["width_px"] <= 1300 and r["min_font_pt"] >= draw.MIN_FONT_PT, r


def test_empty_training_says_why(tmp_path):
    d = write_fixture(tmp_path, loss=False)
    rows = [r for r in runs.read_rows(d / "metrics.csv") if r.stage != "validate"]
    write_rows(d / "metrics.csv", rows)
    (d / "config.yaml").write_text("run: fx-gpu\nvalidate: {arms: []}\n")
    pages.render_run(d, d / "plots")
    why = _side(d, "loss")["why_empty"]
    assert "validate.arms: []" in why
    import html

    assert html.escape(why) in (d / "plots" / "gates.html").read_text()
    assert why.replace("`", "'") in (d / "plots" / "loss.caption.rst").read_text()


def test_caption_ids_are_provenance_ids(gpu_run):
    """Aggregates carry `all` where a draw number would be: the id provenance.json gives the same row."""
    from moebench.ids import number_id

    sp = _side(gpu_run, "speedup")["baselines"]["hf_bf16"]
    us = next(s for s in sp if s["arm"] == "unsloth_bf16")
    assert us["median_from"] == [number_id("fx-gpu", "compare", "unsloth_bf16", None, "speedup_vs_hf_bf16")]
