import json

import pytest
import torch

from conftest import ROOT, tiny_model
from moebench import config as cfgmod
from moebench import data, models
from moebench.io import logger

SPEC = cfgmod.load_yaml("models.yaml")["gpt-oss-20b"]


@pytest.fixture(scope="module")
def tiny():
    """The session's tiny GPT-OSS (conftest.tiny_model: models.build of SPEC, seed 42): the tests only read it."""
    return tiny_model("gpt-oss-20b")


def test_conversations_are_deterministic_harmony_with_several_templates():
    a, b = data.conversations(200, 42), data.conversations(200, 42)
    assert a == b and a != data.conversations(200, 43)
    assert {c["template"] for c in a} >= {"bugfix", "feature"}
    roles = {m["role"] for c in a for m in c["messages"]}
    assert roles == {"system", "developer", "user", "assistant", "tool"}
    assert any(m.get("tool_calls") for c in a for m in c["messages"])


def test_rendered_files_byte_identical_and_split(tiny, tmp_path):
    s1 = data.build(str(tiny), 50, 42, 0.1, str(tmp_path / "a"), logger("t"))
    s2 = data.build(str(tiny), 50, 42, 0.1, str(tmp_path / "b"), logger("t"))
    assert s1 == s2
    train = [json.loads(l) for l in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(l) for l in (tmp_path / "a" / "heldout.jsonl").read_text().splitlines()]
    assert len(train) == 45 and len(held) == 5 and not {c["id"] for c in train} & {c["id"] for c in held}
    text = train[0]["text"]
    assert "<|channel|>analysis<|message|>" in text and "<|channel|>final<|message|>" in text


def test_chatml_fallback_when_tokenizer_has_no_template(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    tok.chat_template = None
    text, how = data.render(data.conversations(3, 42)[0], tok)
    assert how == "chatml" and text.startswith("<|im_start|>system")


def test_tiny_model_keeps_the_architecture(tiny):
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["model_type"] == "gpt_oss" and cfg["architectures"] == ["GptOssForCausalLM"]
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"]
    assert cfg["num_experts_per_tok"] == 4 and cfg["num_local_experts"] == 8


def test_full_config_is_the_published_shape():
    cfg = models.model_config(SPEC, "full")
    assert (cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok, cfg.hidden_size,
            cfg.vocab_size) == (24, 32, 4, 2880, 201088)
    assert cfg.layer_types[:2] == ["sliding_attention", "full_attention"] and len(cfg.layer_types) == 24


def test_from_pretrained_source_path(tiny, tmp_path):
    info = models.build(SPEC, "tiny", str(tiny), str(tmp_path / "copy"), 42, [], logger("t"))
    assert info["how"].startswith("from_pretrained")
    a = models.fingerprint(tiny)["weights_sha256"]
    b = models.fingerprint(tmp_path / "copy")["weights_sha256"]
    assert a == b  # the same weights came back through from_pretrained


def test_bad_source_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="model.source='/nope'"):
        models.build(SPEC, "tiny", "/nope", str(tmp_path / "x"), 42, [], logger("t"))


# ---- more MoE families and routing skew (issue 10) ------------------------------------------------------------
FAMILIES = cfgmod.load_yaml("models.yaml")


@pytest.mark.parametrize("name,shape", [
    ("qwen3-30b-a3b", (48, 128, 8, 2048, 768, 151936, 4, 128)),
    ("olmoe-1b-7b", (16, 64, 8, 2048, 1024, 50304, 16, 128)),
])
def test_published_shapes_of_the_other_families(name, shape):
    from moebench import routing

    m = routing.moe_shape(models.model_config(FAMILIES[name], "full"))
    assert (m["layers"], m["experts"], m["top_k"], m["hidden"], m["expert_inter"], m["vocab"], m["kv_heads"],
            m["head_dim"]) == shape
    assert m["sliding_layers"] == 0  # only GPT-OSS alternates sliding/full attention
    half = models.model_config(FAMILIES[name], "half")
    assert half.num_hidden_layers == m["layers"] // 2 and half.hidden_size == m["hidden"]


def test_qwen3_30b_a3b_active_params_about_3b():
    from moebench import measure

    fm = measure.FlopModel.from_config(models.model_config(FAMILIES["qwen3-30b-a3b"], "full"), lora_r=64)
    assert 2.5e9 < fm.frozen_active_params() < 3.6e9  # published: 3.3B activated


def _router_params(model):
    from moebench import routing

    return {l: {k: v.detach().clone() for k, v in r.named_parameters()} for l, r in routing.routers(model)}


@pytest.mark.parametrize("name,how", [("gpt-oss-20b", "bias"), ("qwen3-30b-a3b", "weight"),
                                      ("olmoe-1b-7b", "weight")])
def test_zipf_skew_changes_routers_only_and_keeps_the_layout(name, how):
    from moebench import routing

    cfg = models.model_config(FAMILIES[name], "tiny")
    cfg.architectures = [FAMILIES[name]["model_class"]]
    plain, skewed = models.random_init(cfg, 1), models.random_init(cfg, 1)
    before = _router_params(skewed)
    assert routing.apply_skew(skewed, 0.0, 7)["how"] == "none" and all(
        torch.equal(before[l][k], v) for l, p in _router_params(skewed).items() for k, v in p.items())
    info = routing.apply_skew(skewed, 1.5, 7)
    assert how in info["how"]
    assert list(plain.state_dict()) == list(skewed.state_dict())  # no new parameter: the published layout
    changed = {n for n, a in plain.state_dict().items() if not torch.equal(a, skewed.state_dict()[n])}
    assert changed and all(n.endswith(("mlp.router.bias", "mlp.gate.weight")) for n in changed)


def test_zipf_prior_is_a_zipf_law():
    from moebench import routing

    g = torch.Generator().manual_seed(0)
    prior = routing.zipf_log_prior(8, 1.0, g)
    p = torch.softmax(prior, 0).sort(descending=True).values
    assert abs(float(prior.mean())) < 1e-9
    assert torch.allclose(p / p[0], 1.0 / torch.arange(1, 9, dtype=p.dtype))  # share of rank k ~ 1/k


def test_skew_makes_the_measured_load_uneven():
    """The load that is reported is measured: a strong skew must show in max/mean and entropy."""
    from moebench import routing

    corpus = data.corpus_text(60, 42)
    tok = models.train_tokenizer(corpus, 1024)
    cfg = models.model_config(SPEC, "tiny")
    cfg.architectures = [SPEC["model_class"]]
    even = models.routing_census(models.random_init(cfg, 3), tok, corpus, "cpu")
    m = models.random_init(cfg, 3)
    routing.apply_skew(m, 3.0, 3)
    skew = models.routing_census(m, tok, corpus, "cpu")
    assert skew["max_over_mean"] > even["max_over_mean"] * 1.2 and skew["entropy_norm"] < even["entropy_norm"]



# ---- router load calibrated at build (issue 20) -----------------------------------------------------------------
def test_build_calibrates_routers_records_the_load_and_keeps_both_router_sets(tiny, tmp_path):
    """A balanced build (bf16, as on a GPU) records the load per layer, saves raw and calibrated routers beside
    the model, and differs from the raw build in router tensors only."""
    from safetensors.torch import load_file

    from moebench import router_calibration

    convs = data.split(data.conversations(10, 42), 0.1, 42)  # 9 to calibrate on (2560 tokens), 1 held out (256)
    info = models.build(SPEC, "tiny", "random-init", str(tmp_path / "m"), 42, data.corpus_text(60, 42),
                        logger("t"), router_load="balanced", calib_convs=convs,
                        routers_out=str(tmp_path / "routers.safetensors"))
    cal = info["routing"]["calibration"]
    assert cal["router_load"] == "balanced" and set(cal["layers"]) == {"0", "1"}
    assert {"max_over_mean", "entropy_norm", "unused"} <= set(cal["layers"]["0"]["after"]) and cal["seconds"] > 0
    assert cal["uniform_floor"] > 1 and cal["settings"] == router_calibration.settings()
    saved = load_file(tmp_path / "routers.safetensors")
    raw_build = load_file(tiny / "model.safetensors")  # the fixture: same seed, router_load raw
    new_build = load_file(tmp_path / "m" / "model.safetensors")
    routers = {k.split("/", 1)[1] for k in saved}
    assert routers == {k for k in new_build if k.endswith(("mlp.router.weight", "mlp.router.bias"))}
    assert all(torch.equal(saved[f"raw/{k}"], raw_build[k]) and torch.equal(saved[f"saved/{k}"], new_build[k])
               for k in routers)
    assert {k for k in new_build if not torch.equal(new_build[k], raw_build[k])} <= routers


def test_from_pretrained_keeps_its_trained_routers(tiny, tmp_path):
    convs = data.split(data.conversations(20, 42), 0.1, 42)
    info = models.build(SPEC, "tiny", str(tiny), str(tmp_path / "copy"), 42, [], logger("t"),
                        router_load="balanced", calib_convs=convs)
    assert info["routing"]["calibration"]["router_load"] == "trained"
    assert models.fingerprint(tiny)["weights_sha256"] == models.fingerprint(tmp_path / "copy")["weights_sha256"]


def test_numeric_router_load_under_a_skew_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="routing_skew 0 with a numeric router_load"):
        models.build(SPEC, "tiny", "random-init", str(tmp_path / "x"), 42, [], logger("t"), routing_skew=1.0,
                     router_load=2.2)
