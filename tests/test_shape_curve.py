"""The shape curve: one fresh process per shape, an OOM recorded as a result, the point ratio of the verdict pair
tabled beside (never under) the verdict."""
from dataclasses import replace

import pytest

from moebench import aggregate, harness, probe, shape_curve
from moebench.metrics import Row, read_rows

RUN = "results/h200-gptoss20b-tier"


def _row(arm, metric, value, status="measured", reason=""):
    return Row("r", "h200_141gb", "gpt-oss-20b", arm, "bf16", "bench", metric, value, "s", None, None, status, reason,
               "probe.log", 1)


def fake_probe(max_batch, seen):
    """A bench process that trains up to max_batch (0.1 ms per token) and runs out of memory above it."""
    def run(args, change, workdir, plog, log, timing=None, draw=1):
        seen.append((args.arm, change, timing))
        tokens = change["batch"] * change["seq_len"]
        if change["batch"] > max_batch:
            return "oom", [_row(args.arm, "step_s", None, "failed", "OOM at batch x seq: CUDA out of memory")]
        return "measured", [_row(args.arm, "step_s", tokens * 1e-4), _row(args.arm, "tokens_per_s", 1e4),
                            _row(args.arm, "alloc_after_load_gb", 40.0)]
    return run


def _main(tmp_path, monkeypatch, arm, limit=2, extra=()):
    seen = []
    monkeypatch.setattr(probe, "bench_probe", fake_probe(limit, seen))
    monkeypatch.setattr(harness, "unavailable", lambda *a, **k: None)
    out = tmp_path / f"{arm}.csv"
    shape_curve.main(["--config", f"{RUN}/config.yaml", "--tier", f"{RUN}/tier.json", "--model", "m", "--data", "d",
                      "--arm", arm, "--out", str(out), "--log", str(tmp_path / f"{arm}.log"), *extra])
    return read_rows(out), seen


def test_recipe_points_are_their_own_stage_and_draw(tmp_path, monkeypatch):
    """config recipe.points runs through the shape curve's code: only the points asked for, rows of stage `point`
    with the rule's draw number, so a second draw has ids of its own beside the shape curve's."""
    rows, seen = _main(tmp_path, monkeypatch, "unsloth_bf16",
                       extra=["--stage", "point", "--shapes", "4x4096", "--draw", "2"], limit=8)
    assert [c for _, c, _ in seen] == [{"batch": 4, "seq_len": 4096}]
    assert {(r.stage, r.draw) for r in rows} == {("point", 2)}
    assert "tokens_per_s@4x4096" in {r.metric for r in rows}


def test_each_shape_is_its_own_process_and_an_oom_is_a_row(tmp_path, monkeypatch):
    rows, seen = _main(tmp_path, monkeypatch, "unsloth_bf16")
    assert [c for _, c, _ in seen] == [{"batch": 1, "seq_len": 2048}, {"batch": 4, "seq_len": 4096},
                                       {"batch": 1, "seq_len": 16384}]
    assert all(t == {"timed_steps": 5, "min_timed_s": 10} for _, _, t in seen)  # the schema's defaults
    by = {r.metric: r for r in rows}
    assert all(r.stage == "shape" for r in rows) and "alloc_after_load_gb@1x2048" not in by
    assert by["step_s@1x2048"].value == pytest.approx(0.2048) and by["step_s@1x16384"].status == "measured"
    assert by["step_s@4x4096"].status == "failed" and by["step_s@4x4096"].reason.startswith("OOM")


def test_a_malformed_shape_names_itself():
    with pytest.raises(ValueError, match="'4k' is not BATCHxSEQ"):
        shape_curve.shapes(["1x2048", "4k"])


def test_the_curve_table_pairs_the_verdict_arms_per_shape(tmp_path, monkeypatch):
    bf, _ = _main(tmp_path, monkeypatch, "unsloth_bf16")
    q4 = [replace(r, arm="unsloth_4bit", value=r.value * 5 if r.value and r.metric.startswith("step_s") else r.value)
          for r in bf]
    pts = aggregate.shape_curve(bf + q4)
    assert [p["tokens_per_step"] for p in pts] == [2048, 16384, 16384]
    assert pts[0]["ratio_4bit_over_bf16"] == pytest.approx(5.0)
    oom = next(p for p in pts if p["batch"] == 4)
    assert "ratio_4bit_over_bf16" not in oom and oom["arms"]["unsloth_bf16"]["reason"].startswith("OOM")
    table = aggregate.curve_note(pts)
    assert "| 1×2048 | 2048 | 1.024 | 0.2048 | 5.00x |" in table and "failed: OOM" in table
    assert aggregate.curve_note([]) == ""


def test_the_shape_figure_draws_single_draws_beside_the_verdict_point(tmp_path, monkeypatch):
    from moebench.report import figures
    from moebench.report.runs import Run

    bf, _ = _main(tmp_path, monkeypatch, "unsloth_bf16")
    q4 = [replace(r, arm="unsloth_4bit", value=r.value * 3 if r.value and r.metric.startswith("step_s") else r.value)
          for r in bf]
    verdict = {"reference": "unsloth_4bit", "speedup": 4.87, "interval": [4.86, 4.88], "n_draws": 3,
               "shape": {"batch": 2, "seq_len": 4096, "tokens_per_step": 8192},
               "shape_curve": aggregate.shape_curve(bf + q4)}
    figures.fig_shapes(Run("fx", [], None, verdict, tmp_path), tmp_path / "plots")
    side = __import__("json").loads((tmp_path / "plots" / "shapes.json").read_text())
    assert [p["tokens_per_step"] for p in side["points"]] == [2048, 16384]  # the OOM shape is no point
    assert side["tier"]["ratio"] == 4.87 and side["why_empty"] is None
    r = side["render"]
    assert 1 / 3 <= r["width_px"] / r["height_px"] <= 3 and r["min_font_pt"] >= 9
    assert "single draw" in (tmp_path / "plots" / "shapes.caption.rst").read_text()


def test_a_probe_keeps_its_process_console_beside_its_run_log(tmp_path, monkeypatch):
    """Unsloth prints its fallbacks only on stdout: a shape or sweep point keeps what its process printed, as a
    bench draw does, so a reader can check the degraded lines the bench matched."""
    import argparse
    import logging

    printed = "Unsloth: Using default MoE kernel configurations\n"
    monkeypatch.setattr(probe, "run_bounded", lambda cmd, timeout: (1, printed))
    args = argparse.Namespace(config=f"{RUN}/config.yaml", tier=f"{RUN}/tier.json", model="m", data="d",
                              arm="unsloth_4bit")
    plog = tmp_path / "shapes" / "unsloth_4bit_1x2048" / "run.log"
    out, rows = probe.bench_probe(args, {"batch": 1, "seq_len": 2048}, tmp_path, plog, logging.getLogger("t"))
    assert (plog.parent / "console.log").read_text() == printed
    assert rows == [] and out.startswith("failed: no result (exit 1)")
