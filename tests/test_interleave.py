"""The interleaved driver's order and calls (Snakemake replaced by a recorder; the real chain runs elsewhere)."""
import json

from moebench import interleave as IL


def test_order_alternates_arms_draw_by_draw():
    assert IL.order(["unsloth_bf16", "unsloth_4bit"], 3) == [
        ("unsloth_bf16", 1), ("unsloth_4bit", 1), ("unsloth_bf16", 2), ("unsloth_4bit", 2),
        ("unsloth_bf16", 3), ("unsloth_4bit", 3)]


def test_checked_checkpoint_is_a_prerequisite_only_where_it_is_used():
    gpu = IL.prerequisites("r", ["unsloth_bf16", "unsloth_4bit"], "gpt-oss-20b", gpu=True)
    assert "results/r/model-unsloth-bnb4.check.json" in gpu
    assert not any("bnb4" in t for t in IL.prerequisites("r", ["unsloth_4bit"], "gpt-oss-20b", gpu=False))
    assert not any("bnb4" in t for t in IL.prerequisites("r", ["unsloth_4bit"], "qwen3-30b-a3b", gpu=True))


def test_driver_runs_inputs_then_draws_in_order_then_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("run: r\nmodel: {name: gpt-oss-20b, source: random-init}\n")
    calls = []

    def fake(args, targets, log):
        calls.append((args, targets))
        if targets == ["results/r/tier.json"]:
            (tmp_path / "results/r").mkdir(parents=True)
            (tmp_path / "results/r/tier.json").write_text(json.dumps(
                {"tier": "h200_141gb", "gpu": {"name": "H200"}, "plan": {"draws": 2, "verdict_draws": 3}}))
        return 0

    monkeypatch.setattr(IL, "snakemake", fake)
    try:
        IL.main(["--configfile", "run.yaml", "--", "--cores", "8"])
    except SystemExit as e:
        assert e.code == 0
    targets = [t for _, ts in calls for t in ts]
    draws = [t for t in targets if "/arms/" in t]
    assert draws == [f"results/r/arms/{a}/draw{k}/metrics.csv" for k in (1, 2, 3)
                     for a in ("unsloth_bf16", "unsloth_4bit")]
    assert "results/r/model-unsloth-bnb4.check.json" in targets[:targets.index(draws[0])]
    assert calls[-1][1] == [] and all("--cores" in a for a, _ in calls)  # the rest: the default target
