"""The recipe search on synthetic grids: headroom, ties, everything out of memory, degraded rows, too few draws,
pruning; and the rows it reads (bench, energy, offload, sweep) mapped onto the right grid point."""
import json

import pytest

from conftest import background
from moebench import grid, provenance, recipe
from moebench.report import recipe_page
from moebench.metrics import Row, write_rows

TIER = {"tier": "h200_141gb", "gpu": {"name": "NVIDIA H200", "memory_gb": 100.0},
        "plan": {"batch": 2, "seq_len": 4096, "gradient_checkpointing": "unsloth"}}


def draw(arm, d, tps, peak_gib, stage="bench", loss=(3.0, 2.5), j=None, status="measured", reason="", metric_at=""):
    """The rows one fresh process writes at one setting (metric_at: a sweep's '@1x8192' suffix)."""
    base = dict(run_id="r", tier="h200_141gb", model="m", arm=arm, precision="bf16", stage=stage,
                source=f"{arm}/{stage}/draw{d}{metric_at}/run.log", draw=d)
    rows = [Row(**base, metric=f"tokens_per_s{metric_at}", value=tps, unit="tokens/s", status=status, reason=reason),
            Row(**base, metric=f"peak_reserved_gb{metric_at}", value=peak_gib * 2**30 / 1e9, unit="GB")]
    if loss:
        rows += [Row(**base, metric=f"loss_first{metric_at}", value=loss[0], unit="nats"),
                 Row(**base, metric=f"loss_last{metric_at}", value=loss[1], unit="nats")]
    if j:
        e = dict(base, stage="energy")
        rows += [Row(**e, metric="j_per_token_net", value=j[0], unit="J/token"),
                 Row(**e, metric="j_per_token", value=j[1], unit="J/token")]
    return rows


def oom(arm, d, stage="bench", metric_at=""):
    return [Row("r", "h200_141gb", "m", arm, "bf16", stage, f"step_s{metric_at}", status="failed",
                reason="OOM: CUDA out of memory", source=f"{arm}/d{d}{metric_at}", draw=d)]


def test_fastest_pick_is_measured_with_its_draws_spread_and_ids():
    rows = draw("a", 1, 1000, 50) + draw("a", 2, 1100, 50) + draw("b", 1, 500, 30) + draw("b", 2, 520, 30)
    p = recipe.search(rows, TIER)["picks"]["fastest"]
    assert p["status"] == "measured" and p["setting"] == {"arm": "a", "precision": "bf16", "batch": 2,
                                                          "seq_len": 4096, "mode": "plain"}
    assert p["value"] == 1050 and (p["min"], p["max"], p["n"]) == (1000, 1100, 2)
    assert "r/bench/a/d1/tokens_per_s" in p["ids"] and len(p["sources"]) == 2
    assert p["runner_up"]["label"].startswith("b ·")
    near = [(x["setting"]["batch"], x["setting"]["seq_len"]) for x in recipe.search(rows, TIER)["refine"]]
    assert near == [(4, 4096), (2, 8192)]


def test_headroom_boundary_on_the_cards_memory():
    # card 100 GiB, 10% headroom: 90 GiB fits, just above does not
    fits = draw("a", 1, 900, 90.0) + draw("a", 2, 900, 90.0)
    over = draw("b", 1, 2000, 90.01) + draw("b", 2, 2000, 90.01)
    doc = recipe.search(fits + over, TIER)
    assert doc["limit_gib"] == pytest.approx(90.0)
    assert doc["picks"]["fastest"]["setting"]["arm"] == "a"
    assert any(x["setting"]["arm"] == "b" and "above the headroom limit" in x["why"]["fastest"] for x in doc["excluded"])
    assert recipe.search(fits + over, TIER, {"headroom": 0.05})["picks"]["fastest"]["setting"]["arm"] == "b"


def test_a_tie_needs_three_draws_and_says_so():
    rows = draw("a", 1, 1000, 50) + draw("a", 2, 1000, 50) + draw("b", 1, 1000, 60) + draw("b", 2, 1000, 60)
    p = recipe.search(rows, TIER)["picks"]["fastest"]
    assert p["setting"]["arm"] == "a"  # the tie goes to the smaller memory, deterministically
    assert p["runner_up"]["gap"] == 0 and "tie" in p["runner_up"]["note"]
    assert p["status"] == "needs draws" and p["missing"] == "needs 1 more draw"
    doc = recipe.search(rows + draw("a", 3, 1000, 50), TIER)
    assert doc["picks"]["fastest"]["status"] == "measured" and not doc["next"]


def test_within_five_percent_needs_three_draws_beyond_it_two():
    close = draw("a", 1, 1000, 50) + draw("a", 2, 1000, 50) + draw("b", 1, 960, 50) + draw("b", 2, 960, 50)
    assert recipe.search(close, TIER)["picks"]["fastest"]["draws_needed"] == 1
    far = draw("a", 1, 1000, 50) + draw("a", 2, 1000, 50) + draw("b", 1, 900, 50) + draw("b", 2, 900, 50)
    assert recipe.search(far, TIER)["picks"]["fastest"]["status"] == "measured"


def test_too_few_draws_are_named_not_hidden():
    doc = recipe.search(draw("a", 1, 1000, 50), TIER)
    p = doc["picks"]["fastest"]
    assert p["status"] == "needs draws" and p["missing"] == "needs 1 more draw" and p["spread"].startswith("one draw")
    assert doc["next"][0]["draws_needed"] == 1 and doc["next"][0]["setting"]["arm"] == "a"


def test_everything_out_of_memory_gives_no_pick_and_says_why():
    rows = oom("a", 1) + oom("a", 2) + oom("b", 1)
    doc = recipe.search(rows, TIER)
    for p in doc["picks"].values():
        assert p["status"] == "none" and p["reason"] == "every setting ran out of memory"
    assert {x["arm"] for x in doc["pruned"]} == {"a", "b"}
    assert "OOM" in doc["pruned"][0]["why"]


def test_an_oom_in_one_draw_disqualifies_the_setting():
    rows = draw("a", 1, 2000, 50) + oom("a", 2) + draw("b", 1, 500, 30) + draw("b", 2, 500, 30)
    doc = recipe.search(rows, TIER)
    assert doc["picks"]["fastest"]["setting"]["arm"] == "b"
    assert "failed in 1 of 2 draws" in next(x for x in doc["excluded"] if x["setting"]["arm"] == "a")["why"]["fastest"]


def test_degraded_rows_are_excluded_unless_allowed():
    deg = draw("a", 1, 3000, 50, status="degraded", reason="fell back to the eager loop") + \
        draw("a", 2, 3000, 50, status="degraded", reason="fell back to the eager loop")
    ok = draw("b", 1, 1000, 50) + draw("b", 2, 1000, 50)
    assert recipe.search(deg + ok, TIER)["picks"]["fastest"]["setting"]["arm"] == "b"
    assert recipe.search(deg + ok, TIER, {"allow_degraded": True})["picks"]["fastest"]["setting"]["arm"] == "a"


def test_smallest_that_trains_needs_a_falling_finite_loss():
    rows = (draw("tiny", 1, 100, 10, loss=(3.0, 3.1)) + draw("tiny", 2, 100, 10, loss=(3.0, 3.2))  # loss rises
            + draw("noloss", 1, 100, 12, loss=None) + draw("noloss", 2, 100, 12, loss=None)
            + draw("ok", 1, 100, 20) + draw("ok", 2, 100, 20) + draw("big", 1, 900, 80) + draw("big", 2, 900, 80))
    doc = recipe.search(rows, TIER)
    p = doc["picks"]["smallest"]
    assert p["setting"]["arm"] == "ok" and p["value"] == pytest.approx(20) and p["unit"] == "GiB"
    why = {x["setting"]["arm"]: x["why"].get("smallest") for x in doc["excluded"]}
    assert why["tiny"] == "loss not finite or did not fall" and why["noloss"].startswith("no loss recorded")


def test_lowest_net_energy_with_gross_beside_it():
    rows = (draw("a", 1, 1000, 50, j=(0.5, 0.9)) + draw("a", 2, 1000, 50, j=(0.7, 1.1))
            + draw("b", 1, 900, 40, j=(0.3, 0.6)) + draw("b", 2, 900, 40, j=(0.3, 0.6)) + draw("c", 1, 99, 9))
    p = recipe.search(rows, TIER)["picks"]["lowest_energy"]
    assert p["setting"]["arm"] == "b" and p["value"] == 0.3 and p["gross_j_per_token"] == 0.6
    assert p["runner_up"]["value"] == pytest.approx(0.6)
    # a draw without energy rows does not count towards the energy pick's draws
    p = recipe.search(draw("a", 1, 1000, 50, j=(0.5, 0.9)) + draw("a", 2, 1000, 50), TIER)["picks"]["lowest_energy"]
    assert p["n"] == 1 and p["missing"] == "needs 1 more draw"
    p = recipe.search(draw("a", 1, 1000, 50) + draw("a", 2, 1000, 50), TIER)["picks"]["lowest_energy"]
    assert p["status"] == "none" and p["reason"] == "no setting qualifies: no net J/token measured"


def test_dominated_and_skipped_arms_are_pruned_with_reasons():
    rows = (draw("fast", 1, 1000, 40, j=(0.3, 0.5)) + draw("fast", 2, 1000, 40, j=(0.3, 0.5))
            + draw("slow", 1, 300, 60, j=(0.9, 1.2)) + draw("slow", 2, 300, 60, j=(0.9, 1.2))
            + draw("mixed", 1, 200, 10) + draw("mixed", 2, 200, 10)
            + [Row("r", "t", "m", "gone", "nf4", "bench", "step_s", status="skipped", reason="needs CUDA", draw=1)])
    pruned = {x["arm"]: x["why"] for x in recipe.search(rows, TIER)["pruned"]}
    assert set(pruned) == {"slow", "gone"}
    assert pruned["slow"].startswith("fast beats it") and "1000 vs 300 tokens/s" in pruned["slow"]
    assert "needs CUDA" in pruned["gone"]


def test_rows_map_onto_their_grid_points():
    plan = TIER["plan"]
    r = Row("r", "t", "m", "hf_bf16+expert_offload", "bf16", "offload", "tokens_per_s", 5.0)
    assert recipe.setting_of(r, plan)[0] == ("hf_bf16", "bf16", 2, 4096, "expert_offload")
    s = Row("r", "t", "m", "unsloth_bf16", "bf16", "sweep", grid.shape_metric("tokens_per_s", 1, 16384), 5.0)
    assert recipe.setting_of(s, plan) == (("unsloth_bf16", "bf16", 1, 16384, "unsloth"), "tokens_per_s")
    for capped in (grid.shape_metric("fits", 1, 8192, 24), "tokens_per_s@cap24[ckpt=plain]"):
        assert recipe.setting_of(Row("r", "t", "m", "a", "bf16", "sweep", capped, 1.0), plan) is None
    assert recipe.setting_of(Row("r", "t", "m", "a", "bf16", "compare", "speedup_vs_x", 1.0), plan) is None
    assert grid.parse_shape_metric("tokens_per_s@1x16384@cap40") == ("tokens_per_s", 1, 16384, 40.0)
    assert grid.mode_of(False) == "none" and grid.mode_of(True) == "plain"
    assert grid.mode_of("unsloth", "unsloth_bf16") == "unsloth" and grid.mode_of("unsloth", "e4b_4bit") == "plain"
    assert recipe.setting_of(Row("r", "t", "m", "hf_bf16", "bf16", "bench", "tokens_per_s", 5.0), plan)[0][-1] == "plain"
    assert recipe._row_id(r) == provenance.row_id(r)


def test_sweep_points_compete_with_bench_points():
    at = "@1x16384"
    rows = (draw("a", 1, 1000, 50) + draw("a", 2, 1000, 50)
            + draw("a", 0, 1500, 85, stage="sweep", metric_at=at) + draw("a", 1, 1480, 86, stage="sweep", metric_at=at))
    p = recipe.search(rows, TIER)["picks"]["fastest"]
    assert (p["setting"]["batch"], p["setting"]["seq_len"], p["n"]) == (1, 16384, 2)


def test_shape_curve_and_recipe_points_are_draws_of_their_setting():
    """A shape-curve point and a recipe point at the same setting are two fresh processes: together they give a
    pick its two draws; alone, the pick is named with the config line that measures what it lacks."""
    at = "@4x4096"
    shape = draw("a", 1, 1500, 60, stage="shape", metric_at=at)
    alone = recipe.search(draw("a", 1, 1000, 50) + draw("a", 2, 1000, 50) + shape, TIER)
    assert alone["picks"]["fastest"]["status"] == "needs draws"
    assert alone["next"][0]["point"] == "a:4x4096"
    assert "config `recipe.points: [a:4x4096]`" in recipe.render_md(alone, {"model": {"name": "m"}}, TIER["plan"])
    both = recipe.search(draw("a", 1, 1000, 50) + draw("a", 2, 1000, 50) + shape
                         + draw("a", 1, 1480, 61, stage="point", metric_at=at), TIER)["picks"]["fastest"]
    assert (both["setting"]["batch"], both["n"], both["status"]) == (4, 2, "measured")


def test_main_writes_json_and_a_page_with_a_snippet(tmp_path):
    from conftest import ROOT

    rows = draw("unsloth_bf16", 1, 1000, 50, j=(0.5, 0.9)) + draw("unsloth_bf16", 2, 1010, 50, j=(0.5, 0.9))
    write_rows(tmp_path / "metrics.csv", rows)
    (tmp_path / "tier.json").write_text(json.dumps(TIER))
    recipe.main(["--config", str(ROOT / "config" / "config.yaml"), "--tier", str(tmp_path / "tier.json"),
                 "--metrics", str(tmp_path / "metrics.csv"), "--out", str(tmp_path / "recipe.json"),
                 "--markdown", str(tmp_path / "recipe.md"), "--out-html", str(tmp_path / "recipe.html"),
                 "--log", str(tmp_path / "recipe.log")])
    doc = json.loads((tmp_path / "recipe.json").read_text())
    assert doc["picks"]["fastest"]["status"] == "measured" and doc["headroom"] == 0.1
    md = (tmp_path / "recipe.md").read_text()
    assert "| the fastest configuration that fits with headroom | unsloth_bf16 · batch 2 × seq 4096 · unsloth |" in md
    assert "from unsloth import FastLanguageModel" in md and "SEQ_LEN, BATCH, MAX_STEPS = 4096, 2, 100" in md
    page = (tmp_path / "recipe.html").read_text()  # the report's page: the picks, their ids, the snippet
    assert "<td>unsloth_bf16 · batch 2 × seq 4096 · unsloth</td>" in page
    assert all(f"<code>{i}</code>" in page for i in doc["picks"]["fastest"]["ids"])
    assert "from unsloth import FastLanguageModel" in page and "1 setting(s)" in page


# ---------------------------------------------------------------- capacity sweeps (the grid's sweep points)
from moebench import sweep  # noqa: E402


def test_fresh_processes_confirm_the_ladders_boundary():
    calls = []

    def fresh(limit):
        return lambda v: calls.append(v) or ("measured" if v <= limit else "oom")

    assert sweep.confirm(fresh(8192), 8192, 16384, 1024, 65536) == (8192, [(8192, "measured"), (16384, "oom")])
    calls.clear()  # the ladder was pessimistic (fragmented allocator): the fresh fit stands, one step further
    assert sweep.confirm(fresh(20000), 8192, 16384, 1024, 65536)[0] == 16384 and calls == [8192, 16384, 32768]
    calls.clear()  # the in-process fit does not fit fresh: step down
    assert sweep.confirm(fresh(4096), 8192, 16384, 1024, 65536)[0] == 4096 and calls == [8192, 4096]
    assert sweep.confirm(fresh(0), None, 1024, 1024, 65536) == (None, [(1024, "oom")])
    assert sweep.confirm(fresh(10**6), 65536, None, 1024, 65536) == (65536, [(65536, "measured")])


def _sweep_args(tmp_path, tier, kind="seq", arm="hf_bf16"):
    from conftest import ROOT

    (tmp_path / "tier.json").write_text(json.dumps(tier))
    return ["--config", str(ROOT / "config" / "config.yaml"), "--tier", str(tmp_path / "tier.json"), "--model",
            str(tmp_path / "model"), "--data", str(tmp_path / "data" / "train.jsonl"), "--arm", arm, "--kind", kind,
            "--out", str(tmp_path / f"{kind}.csv"), "--log", str(tmp_path / f"{kind}.log")]


@pytest.mark.parametrize("kind,metric", [("seq", "max_seq_len"), ("batch", "max_batch")])
def test_sweep_on_cpu_is_a_skipped_row_saying_why(tmp_path, kind, metric):
    from moebench.metrics import read_rows

    sweep.main(_sweep_args(tmp_path, {"tier": "cpu", "gpu": None, "plan": {"seq_len": 256, "batch": 1}}, kind))
    (row,) = read_rows(tmp_path / f"{kind}.csv")
    assert (row.stage, row.metric, row.status) == ("sweep", metric, "skipped") and "no GPU" in row.reason


def test_answer_reads_the_ladder_and_adds_fresh_draws():
    from moebench import harness

    sw = sweep.settings({"capacity": {"seq_min": 1024, "seq_max": 65536}})
    ctx = harness.Ctx("r", "h200_141gb", "m", "a", "bf16", None, "sweep.log", stage="sweep")
    lad = harness.Ctx("r", "h200_141gb", "m", "a", "bf16", 0, "ladder.log", stage="sweep")
    for s in (1024, 2048, 4096):
        lad.add(grid.shape_metric("tokens_per_s", 1, s), 1000.0 + s, "tokens/s")
    lad.add(grid.shape_metric("step_s", 1, 8192), status="failed", reason="OOM: CUDA out of memory")
    assert sweep.ladder_outcomes(lad.rows, "seq")[:2] == (4096, 8192)
    harness.mark_degraded(lad, "console: fell back")  # a fallback path still fitted: the boundary stands
    assert sweep.ladder_outcomes(lad.rows, "seq")[:2] == (4096, 8192)
    sweep.answer(ctx, "seq", sw, lad.rows, lambda v: "measured" if v <= 4096 else "oom", logging_stub())
    (row,) = ctx.rows
    assert (row.metric, row.value, row.unit) == ("max_seq_len", 4096, "tokens")
    assert "fresh processes: 4096 measured, 8192 oom" in row.reason
    # a ladder cut by its time limit says so instead of claiming the search limit was reached
    ctx.rows.clear()
    cut = lad.rows[:3] + [Row("r", "t", "m", "a", "bf16", "sweep", "max_seq_len", status="failed",
                              reason="ArmTimeout: draw exceeded arm_timeout_s=900 s", source="ladder.log", draw=0)]
    sweep.answer(ctx, "seq", sw, cut, lambda v: "measured", logging_stub())
    assert ctx.rows[0].value == 4096 and "the ladder stopped early (ArmTimeout" in ctx.rows[0].reason


def logging_stub():
    import logging

    return logging.getLogger("test-sweep")


def test_cap_reason_says_when_a_cap_cannot_change_the_answer():
    card = int(139.8 * 2**30)
    assert "above this card" in sweep.cap_reason(160, card, 50.0)
    assert "cannot change the answer" in sweep.cap_reason(80, card, 50.0)  # 50 GB peak < 80 GiB
    assert sweep.cap_reason(40, card, 50.0) is None and sweep.cap_reason(24, card, None) is None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import tiny_workdir

    d = tmp_path_factory.mktemp("tiny")
    return d, tiny_workdir(d, conversations=12)


def test_ladder_climbs_in_one_process_and_records_the_oom(tiny, monkeypatch):
    """The real ladder on the tiny model (CPU): sizes climb in one process; an OOM is a row, not a crash."""
    import torch

    from moebench import arms, config as cfgmod, harness

    tmp_path, tier = tiny
    real = harness.train_step

    def step(model, opt, x):
        if x.shape[1] >= 128:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, opt, x)

    monkeypatch.setattr(harness, "train_step", step)
    cfg = cfgmod.load(str(__import__("conftest").ROOT / "config" / "config.yaml"))
    cfg["lora"].update(r=4, alpha=8)
    cfg["capacity"] = {"seq_min": 32, "seq_max": 256, "steps": 2}
    ctx = harness.Ctx("r", "cpu", "m", "hf_bf16", "bf16", 0, "ladder.log", stage="sweep")
    sweep.ladder(ctx, arms.get("hf_bf16"), cfg, tier, "seq", str(tmp_path / "model"),
                 str(tmp_path / "data" / "train.jsonl"), logging_stub())
    by = {r.metric: r for r in ctx.rows}
    assert by["tokens_per_s@1x32"].status == "measured" and by["tokens_per_s@1x64"].status == "measured"
    assert by["loss_last@1x64"].value < by["loss_first@1x64"].value and "peak_rss_gb@1x64" in by  # it trains
    assert by["step_s@1x128"].status == "failed" and by["step_s@1x128"].reason.startswith("OOM")
    assert "tokens_per_s@1x256" not in by  # stopped at the first OOM
    assert sweep.ladder_outcomes(ctx.rows, "seq")[:2] == (64, 128)


def test_peak_memory_prefers_reserved_then_alloc_then_host_rss():
    base = dict(run_id="r", tier="cpu", model="m", arm="a", precision="bf16", stage="bench", source="s", draw=1)
    rows = [Row(**base, metric="tokens_per_s", value=10.0), Row(**base, metric="peak_rss_gb", value=2.0, unit="GB"),
            Row(**base, metric="peak_alloc_gb", value=1.0, unit="GB")]
    (s,) = recipe.collect(rows, TIER["plan"]).values()
    assert s.peak() == pytest.approx(1e9 / 2**30)
    rows.append(Row(**base, metric="peak_reserved_gb", value=1.5, unit="GB"))
    (s,) = recipe.collect(rows, TIER["plan"]).values()
    assert s.peak() == pytest.approx(1.5e9 / 2**30)
    (s,) = recipe.collect(rows[:2], TIER["plan"]).values()
    assert s.peak() == pytest.approx(2e9 / 2**30)


@background("sweep_chain")
def sweep_chain(tmp_path_factory):
    """The sweep of test_sweep_process_chain_on_a_pretend_gpu_tier, run beside the unit tests: a tiny workdir, then
    `python -m moebench.sweep` at SLACK_NICE (its ladder and bench processes inherit it). Returns (its directory,
    the tier, the finished process)."""
    import sys

    import yaml

    from conftest import ROOT, SLACK_NICE, process, tiny_workdir

    d = tmp_path_factory.mktemp("sweep_chain")
    tier = tiny_workdir(d, conversations=12)
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg.update(capacity={"seq_min": 32, "seq_max": 64, "steps": 2}, lora={**cfg["lora"], "r": 4, "alpha": 8})
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    args = _sweep_args(d, {**tier, "gpu": {"name": "pretend", "memory_gb": 1.0}})
    args[1] = str(d / "config.yaml")
    return d, tier, process([sys.executable, "-m", "moebench.sweep", *args], d, nice=SLACK_NICE)


def test_sweep_process_chain_on_a_pretend_gpu_tier(sweep_chain):
    """The whole chain on CPU with a tier that claims a GPU: the ladder in its own process, the boundary in a
    fresh bench process, rows the recipe reads as two draws of one setting. (On CPU nothing runs out of memory,
    so the ladder reaches its search limit.)"""
    from moebench.metrics import read_rows

    d, tier, ran = sweep_chain
    assert ran.returncode == 0, ran.out[-3000:]
    rows = read_rows(d / "seq.csv")
    by = {(r.metric, r.draw): r for r in rows}
    assert by[("tokens_per_s@1x32", 0)].source.endswith("seq_ladder.log")
    assert by[("tokens_per_s@1x64", 1)].source == str(d / "seq.log")  # the fresh bench process, relabelled
    answer = by[("max_seq_len", None)]
    assert answer.value == 64 and "fresh processes: 64 measured" in answer.reason
    assert (d / "probe_seq_batch1_seq_len64" / "run.log").exists()
    point = recipe.collect(rows, tier["plan"])[("hf_bf16", "bf16", 1, 64, "none")]
    assert len(point.ran()) == 2  # two processes measured batch 1 x seq 64


def test_recipe_point_targets_spread_draws_and_name_a_foreign_arm():
    from moebench import workflowlib as wl

    cfg = {"arms": ["a", "b"], "recipe": {"points": ["a:4x4096", "b:1x2048", "a:2x8192"], "point_draws": 2}}
    assert wl.recipe_points(cfg) == {"a": ["4x4096", "2x8192"], "b": ["1x2048"]}
    assert wl.point_targets(cfg, "R") == ["R/points/a_d1.csv", "R/points/b_d1.csv", "R/points/a_d2.csv",
                                          "R/points/b_d2.csv"]
    assert wl.point_targets({"arms": ["a"], "recipe": {}}, "R") == []
    with pytest.raises(ValueError, match="names arm 'c'.*add it to `arms`"):
        wl.recipe_points({"arms": ["a"], "recipe": {"points": ["c:1x1024"]}})


def test_sweeps_config_selects_arms_and_kinds():
    from moebench import config as cfgmod, workflowlib as wl

    cfg = {"arms": ["a", "b"]}
    assert wl.sweeps({**cfg, "sweeps": False}) == []
    assert wl.sweeps({**cfg, "sweeps": True}) == [("a", "seq"), ("a", "batch"), ("b", "seq"), ("b", "batch")]
    assert wl.sweeps({**cfg, "sweeps": {"arms": ["b"], "kinds": ["seq"]}}) == [("b", "seq")]
    assert wl.sweeps({**cfg, "sweeps": {"kinds": ["batch"]}}) == [("a", "batch"), ("b", "batch")]
    with pytest.raises(ValueError, match=r"sweeps.arms names \['c'\].*add them to `arms`"):
        wl.sweeps({**cfg, "sweeps": {"arms": ["c"]}})
    base = cfgmod.load_yaml("config.yaml")
    with pytest.raises(cfgmod.ConfigError, match="sweeps"):
        cfgmod.validate({**base, "sweeps": {"kinds": ["width"]}})
    assert cfgmod.validate({**base, "sweeps": {"arms": ["hf_bf16"]}})["sweeps"] == {"arms": ["hf_bf16"]}


def test_cost_sums_each_logs_span_per_stage(tmp_path):
    """What the grid cost: each distinct source log's first-to-last timestamp, per stage; energy rows share their
    draw's log; a log that is not here is counted as missing, not as zero."""
    def log(name, first, last):
        p = tmp_path / name
        p.write_text(f"2026-12-02 10:00:{first:02d},500 bench INFO start\nno stamp here\n"
                     f"2026-12-02 10:{last // 60:02d}:{last % 60:02d},000 bench INFO end\n")
        return str(p)

    d1, sc = log("d1.log", 0, 90), log("shape.log", 10, 250)
    rows = [Row("r", "t", "m", "a", "bf16", "bench", "tokens_per_s", 1.0, source=d1, draw=1),
            Row("r", "t", "m", "a", "bf16", "energy", "j_per_token", 1.0, source=d1, draw=1),
            Row("r", "t", "m", "a", "bf16", "shape", "tokens_per_s@4x64", 1.0, source=sc, draw=1),
            Row("r", "t", "m", "a", "bf16", "shape", "tokens_per_s@8x64", 1.0, source=sc, draw=1),
            Row("r", "t", "m", "a", "bf16", "point", "tokens_per_s@4x64", 1.0, source=str(tmp_path / "gone.log"))]
    c = recipe.cost(rows)
    assert c["bench"] == {"seconds": pytest.approx(89.5), "logs": 1, "missing": 0} and "energy" not in c
    assert c["shape"]["seconds"] == pytest.approx(239.5) and c["point"] == {"seconds": 0.0, "logs": 0, "missing": 1}
    line = recipe_page.cost_line(c)
    assert "shape 4.0 min (1 log)" in line and "1 not here" in line and "sweep): 4.0 min" in line
