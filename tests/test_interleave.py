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


def drive(tmp_path, monkeypatch, run_yaml: str, tier: dict, argv: list[str]) -> list:
    """Run the driver with Snakemake replaced by a recorder (the tier call writes `tier`); returns its calls."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(run_yaml)
    calls = []

    def fake(args, targets, log):
        calls.append((args, targets))
        if targets == ["results/r/tier.json"]:
            (tmp_path / "results/r").mkdir(parents=True)
            (tmp_path / "results/r/tier.json").write_text(json.dumps(tier))
        return 0

    monkeypatch.setattr(IL, "snakemake", fake)
    try:
        IL.main(["--configfile", "run.yaml", *argv])
    except SystemExit as e:
        assert e.code == 0
    return calls


def test_driver_runs_inputs_then_draws_in_order_then_the_rest(tmp_path, monkeypatch):
    calls = drive(tmp_path, monkeypatch, "run: r\nmodel: {name: gpt-oss-20b, source: random-init}\n",
                  {"tier": "h200_141gb", "gpu": {"name": "H200"}, "plan": {"draws": 2, "verdict_draws": 3}},
                  ["--", "--cores", "8"])
    targets = [t for _, ts in calls for t in ts]
    draws = [t for t in targets if "/arms/" in t]
    assert draws == [f"results/r/arms/{a}/draw{k}/metrics.csv" for k in (1, 2, 3)
                     for a in ("unsloth_bf16", "unsloth_4bit")]
    assert "results/r/model-unsloth-bnb4.check.json" in targets[:targets.index(draws[0])]
    assert calls[-1][1] == [] and all("--cores" in a for a, _ in calls)  # the rest: the default target


def _build(tmp_path, weights="w1", seconds=5.5):
    r = tmp_path / "results/r"
    (r / "data").mkdir(parents=True, exist_ok=True)
    (r / "model.sha256").write_text(json.dumps({"files": {"a.safetensors": 1}, "config_sha256": weights,
                                                "routing": {"calibration": {"seconds": seconds}}}))
    (r / "model.fingerprint.json").write_text(json.dumps({"files": {"a.safetensors": {"sha256": weights}}}))
    (r / "data/data.sha256").write_text("abc  train.jsonl\n")


def test_measurements_on_disk_are_kept_only_when_the_rebuild_is_the_same_build(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _build(tmp_path)
    made = ["arms/unsloth_bf16/draw1/metrics.csv", "arms/hf_bf16/draw2/metrics.csv", "validate/unsloth_4bit/metrics.csv",
            "shapes/unsloth_bf16.csv", "sweep/unsloth_bf16/seq.csv"]
    for f in made + ["sweep/unsloth_bf16/seq_ladder.csv", "shapes/unsloth_bf16_1x2048/steps.csv"]:  # not outputs
        (tmp_path / "results/r" / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "results/r" / f).write_text("x\n")
    before = IL.input_hashes("r")
    _build(tmp_path, seconds=6.1)  # a rebuild: same weights, its own timing
    assert IL.kept_outputs("r", before, IL.input_hashes("r"), print) == sorted(f"results/r/{f}" for f in made)
    _build(tmp_path, weights="w2")  # other weights: nothing on disk describes this build
    said = []
    assert IL.kept_outputs("r", before, IL.input_hashes("r"), said.append) == []
    assert "measured again" in said[0] and "model.sha256" in said[0]


def test_verdict_arms_validations_run_before_the_rest(tmp_path, monkeypatch):
    calls = drive(tmp_path, monkeypatch, "run: r\nvalidate: {arms: [unsloth_bf16, hf_bf16]}\n",
                  {"gpu": None, "plan": {"draws": 1}}, ["--rest", "run"])
    assert calls[-2][1] == ["results/r/validate/unsloth_bf16/metrics.csv"]
    assert "results/r/verdict.json" in calls[-1][1]
