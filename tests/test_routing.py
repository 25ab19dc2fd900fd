"""Router-load calibration (issue 20): reaches its target on every family's tiny model, is deterministic, and
changes router tensors only."""
import logging

import pytest
import torch

from moebench import config as cfgmod
from moebench import data, models, router_calibration, routing

FAMILIES = cfgmod.load_yaml("models.yaml")
LOG = logging.getLogger("test_routing")


@pytest.fixture(scope="module")
def blocks():
    """Calibration tokens from the training conversations, held-out tokens from the held-out ones (256-token
    blocks, the CPU tier's bench shape)."""
    tok = models.train_tokenizer(data.corpus_text(60, 42), 1024)
    train, held = data.split(data.conversations(200, 42), 0.1, 42)
    return models._token_blocks(tok, train, 256, 4096), models._token_blocks(tok, held, 256, 4096)


def _tiny(name: str, seed: int = 42):
    cfg = models.model_config(FAMILIES[name], "tiny")
    cfg.architectures = [FAMILIES[name]["model_class"]]
    cfg.vocab_size = 1024
    return models.random_init(cfg, seed, dtype="float32")  # CPU bf16 matmuls are slow; bf16: test_data_models


_CALIBRATED: dict = {}


def _calibrated(name: str, blocks, target="balanced"):
    """(raw model, calibrated model, record), once per family and target."""
    if (name, target) not in _CALIBRATED:
        raw, cal = _tiny(name), _tiny(name)
        rec = router_calibration.calibrate(cal, *blocks, target, 42, LOG)
        _CALIBRATED[name, target] = raw, cal, rec
    return _CALIBRATED[name, target]


def test_uniform_floor_is_the_noise_of_a_perfect_router():
    f2k = router_calibration.uniform_floor(2048, 32, 4)
    assert 1.08 < f2k < 1.2  # GPT-OSS's 32 experts, top-4, on 2,048 tokens
    assert router_calibration.uniform_floor(8192, 32, 4) < f2k  # more tokens, less noise
    assert router_calibration.uniform_floor(2048, 32, 4) == f2k  # seeded


def test_target_shares_balanced_and_zipf_keeping_the_hot_experts():
    raw = torch.tensor([5.0, 50.0, 1.0, 20.0, 9.0, 9.0, 3.0, 2.0])
    even = router_calibration.target_shares(raw, "balanced", 2)
    assert torch.allclose(even, torch.full((8,), 1 / 8, dtype=even.dtype))
    z = router_calibration.target_shares(raw, 2.2, 2)
    assert abs(float(z.max()) * 8 - 2.2) < 1e-6 and abs(float(z.sum()) - 1) < 1e-9
    assert int(z.argmax()) == 1 and float(z[3]) > float(z[2])  # raw's hot experts stay hot
    with pytest.raises(ValueError, match="experts/top_k"):
        router_calibration.target_shares(raw, 4.5, 2)


def test_parse_router_load():
    assert router_calibration.parse("auto", on_gpu=True) == "balanced"
    assert router_calibration.parse("auto", on_gpu=False) == "raw"
    assert router_calibration.parse("2.2", on_gpu=False) == 2.2 and router_calibration.parse(3, True) == 3.0
    with pytest.raises(ValueError, match="model.router_load='0.5'"):
        router_calibration.parse("0.5", on_gpu=True)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_balanced_reaches_the_floor_and_changes_routers_only(name, blocks):
    raw, cal, rec = _calibrated(name, blocks)
    assert rec["reached"] and rec["unused_experts"] == 0, (rec["uniform_floor"], {
        l: (v["before"]["max_over_mean"], v["after"]["max_over_mean"]) for l, v in rec["layers"].items()})
    assert rec["max_over_mean"] <= router_calibration.BALANCED_SLACK * rec["uniform_floor"]
    assert rec["worst_layer_max_over_mean"] <= router_calibration.BALANCED_WORST * rec["uniform_floor"]
    before = sum(l["before"]["max_over_mean"] for l in rec["layers"].values())
    assert rec["max_over_mean"] * len(rec["layers"]) < before  # the raw load was more uneven
    router_names = set(router_calibration.router_state(cal))
    changed = {n for n, t in cal.state_dict().items() if not torch.equal(t, raw.state_dict()[n])}
    assert changed and changed <= router_names  # every other tensor is bit-identical
    assert list(cal.state_dict()) == list(raw.state_dict())  # no new parameter: the published layout


def test_measured_load_agrees_with_router_load_hooks(blocks):
    """The calibration's own count and RouterLoad's (the bench's) see the same top-k choices."""
    _, cal, rec = _calibrated("qwen3-30b-a3b", blocks)
    load = routing.RouterLoad.of(cal)
    load.counting = True
    with torch.no_grad():
        cal(input_ids=blocks[1][:4])
    load.remove()
    mine = router_calibration.measure(cal, blocks[1][:4], 16)
    assert {l: list(c) for l, c in load.counts().items()} == mine


@pytest.mark.parametrize("name", list(FAMILIES))
def test_calibration_is_deterministic(name, blocks):
    """Same seed, same tokens: bit-identical routers (fewer tokens than above: determinism needs no more)."""
    few = blocks[0][::4], blocks[1][::4]
    a, b = _tiny(name), _tiny(name)
    router_calibration.calibrate(a, *few, "balanced", 42, LOG)
    router_calibration.calibrate(b, *few, "balanced", 42, LOG)
    a, b, raw = (router_calibration.router_state(m) for m in (a, b, _tiny(name)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], raw[k]) for k in a)  # and the calibration did change them


@pytest.mark.parametrize("name", ["gpt-oss-20b", "olmoe-1b-7b"])  # bias update and weight optimisation
def test_numeric_target_is_reached(name, blocks):
    _, _, rec = _calibrated(name, blocks, 1.6)
    assert rec["reached"], rec
    assert all(abs(l["after"]["max_over_mean"] - 1.6) <= 0.15 * 1.6 for l in rec["layers"].values())


def test_target_below_the_noise_floor_is_a_clear_error(blocks):
    with pytest.raises(ValueError, match="noise floor.*use router_load: balanced"):
        router_calibration.calibrate(_tiny("gpt-oss-20b"), *blocks, 1.01, 42, LOG)


# ---- raw against calibrated routers inside one process (routing_ab) -------------------------------------------
def _ab(tmp_path, calibrated):
    """Run routing_ab on the tiny GPT-OSS (hf_bf16 arm, CPU) with `calibrated(model)` making the second router
    set from the raw one; returns its rows by metric."""
    from transformers import AutoModelForCausalLM

    from conftest import ROOT, tiny_workdir
    from moebench import routing_ab
    from moebench.metrics import read_rows

    tiny_workdir(tmp_path, "gpt-oss-20b", seq_len=64)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.bfloat16)
    raw = router_calibration.router_state(m)
    calibrated(m)
    router_calibration.save_routers(str(tmp_path / "routers.safetensors"), raw, router_calibration.router_state(m))
    out = tmp_path / "ab" / "metrics.csv"
    routing_ab.main(["--config", str(ROOT / "config" / "config.yaml"), "--tier", str(tmp_path / "tier.json"),
                     "--model", str(tmp_path / "model"), "--routers", str(tmp_path / "routers.safetensors"),
                     "--data", str(tmp_path / "data" / "train.jsonl"), "--arm", "hf_bf16", "--windows", "4",
                     "--steps", "2", "--out", str(out), "--log", str(tmp_path / "ab" / "run.log")])
    return {r.metric: r for r in read_rows(out)}


def test_routing_ab_swaps_router_sets_in_place_and_measures_each_window(tmp_path):
    """A strongly skewed second set must show in its windows' measured load: the swap really happened, A B B A,
    every window on the same token blocks (at learning rate 0 a set's two windows route exactly the same load)."""
    rows = _ab(tmp_path, lambda m: routing.apply_skew(m, 4.0, 1))
    assert {r.stage for r in rows.values()} == {"routing_ab"}
    windows = ((1, "raw"), (2, "calibrated"), (3, "calibrated"), (4, "raw"))
    for w, label in windows:
        assert rows[f"w{w}_{label}_step_s"].status == "measured" and rows[f"w{w}_{label}_step_s"].n == 2
    mm = {w: rows[f"w{w}_{label}_router_max_over_mean"].value for w, label in windows}
    assert min(mm[2], mm[3]) > max(mm[1], mm[4])  # the skewed set routed more unevenly, each time
    assert mm[1] == mm[4] and mm[2] == mm[3]  # same blocks, no weight moved: the data is not a second variable
    assert rows["calibrated_over_raw_step_s"].status == "measured" and rows["calibrated_over_raw_step_s"].value > 0
    # aggregate's per-arm summary of those rows: each set's windows, its mean load, the ratio, in comparison.md
    from moebench import aggregate
    (ab,) = aggregate.routing_ab(list(rows.values()))
    assert ab["ratio"] == rows["calibrated_over_raw_step_s"].value
    assert ab["raw"]["windows"] == ab["calibrated"]["windows"] == 2
    assert ab["calibrated"]["max_over_mean"] == pytest.approx((mm[2] + mm[3]) / 2)
    assert ab["raw"]["peak_gb"] > 0 and "| hf_bf16 | A B B A, same blocks |" in aggregate.routing_note([ab])


def test_swap_reaches_router_tensors_held_in_a_child_module():
    """Unsloth's GPT-OSS router keeps weight/bias in `router.linear` behind properties: the swap must copy them
    (sitting 6 would otherwise have timed raw against raw), and a model with nothing to swap is an error."""
    from torch import nn

    from moebench import routing_ab

    class Wrapped(nn.Module):  # the shape of unsloth_zoo's GptOssTopKRouter
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        weight = property(lambda self: self.linear.weight)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Module()
            self.mlp.router = Wrapped()

    model = nn.Module()
    model.layers = nn.ModuleList([Layer(), Layer()]).requires_grad_(False)
    sets = {i: {"weight": torch.full((3, 4), float(i + 1)), "bias": torch.full((3,), -1.0)} for i in (0, 1)}
    assert routing_ab.swap(model, sets) == 4
    assert torch.equal(model.layers[1].mlp.router.linear.weight, sets[1]["weight"])
    assert torch.equal(model.layers[0].mlp.router.linear.bias, sets[0]["bias"])
    with pytest.raises(RuntimeError, match="no router tensor"):
        routing_ab.swap(nn.Linear(2, 2), sets)


def test_routing_ab_order_is_abba():
    from moebench import routing_ab

    assert routing_ab.order(6) == ["raw", "calibrated", "calibrated", "raw", "raw", "calibrated"]


def test_routing_ab_console_fallback_makes_its_rows_degraded(tmp_path):
    """The A/B's console is read like a draw's: sitting 5's unsloth_4bit A/B printed Unsloth's autotune fallback."""
    from moebench import aggregate
    from moebench.metrics import Row

    d = tmp_path / "routing_ab" / "unsloth_4bit"
    d.mkdir(parents=True)
    (d / "console.log").write_text("[unsloth.kernels.moe.autotune_cache|ERROR]MoE kernel auto-tuning failed: "
                                   "'Autotuner' object has no attribute 'best_config'\n")
    row = lambda arm: Row("r", "t", "m", arm, "nf4", "routing_ab", "calibrated_over_raw_step_s", 0.9, "ratio",
                          source=str(d / "run.log"))
    cfg = {"degraded_patterns": {"unsloth_4bit": ["MoE kernel auto-tuning failed"]}, "recompile_limit": 8}
    out = aggregate.console_degraded([row("unsloth_4bit"), row("hf_bf16")], [], cfg, [d])
    assert out[0].status == "degraded" and "auto-tuning failed" in out[0].reason
    assert out[1].status == "measured"  # another arm's rows: its own console decides


def test_routing_ab_with_identical_sets_is_skipped(tmp_path):
    rows = _ab(tmp_path, lambda m: None)
    assert rows["calibrated_over_raw_step_s"].status == "skipped"
    assert "identical" in rows["calibrated_over_raw_step_s"].reason
    from moebench import aggregate
    (ab,) = aggregate.routing_ab(list(rows.values()))
    assert ab["status"] == "skipped" and "ratio" not in ab and "identical" in aggregate.routing_note([ab])


def test_first_step_snapshot_holds_that_steps_load_only(blocks):
    """bench snapshots the tallies after the first warm-up step: the routing the saved model gives the token
    stream before any LoRA update. Later steps must not leak into it, and router_rows reports it beside the
    window's load."""
    from moebench import bench
    from moebench.harness import Ctx

    _, cal, _ = _calibrated("qwen3-30b-a3b", blocks)
    load = routing.RouterLoad.of(cal)
    load.counting = True
    with torch.no_grad():
        cal(input_ids=blocks[1][:2])
        first = load.snapshot()
        load.mark()
        cal(input_ids=blocks[1][2:6])
        load.mark()
    load.remove()
    assert load.read(first) == router_calibration.measure(cal, blocks[1][:2], 16)
    ctx = Ctx("r", "cpu", "qwen3-30b-a3b", "hf_bf16", "bf16", 1, "x.log")
    bench.router_rows(ctx, load, first)
    by = {r.metric: r for r in ctx.rows}
    want = routing.overall(router_calibration.measure(cal, blocks[1][:2], 16))["max_over_mean"]
    assert by["router_max_over_mean_first_step"].value == pytest.approx(want)
    assert by["router_max_over_mean"].value == pytest.approx(
        routing.overall(router_calibration.measure(cal, blocks[1][2:6], 16))["max_over_mean"])
