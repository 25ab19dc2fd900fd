import json

import pytest
import torch

from conftest import ROOT
from moebench import config as cfgmod
from moebench import data, models
from moebench.io import logger

SPEC = cfgmod.load_yaml("models.yaml")["gpt-oss-20b"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "model"
    models.build(SPEC, "tiny", "random-init", str(d), 42, data.corpus_text(60, 42), logger("t"))
    return d


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
