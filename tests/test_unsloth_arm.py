"""The Unsloth arms' CPU-checkable parts: the switches set before import, and the MoE autotune prewarm's arguments
(the same ones unsloth_zoo's forward_triton_grouped_gemm passes, so the traced call finds them cached)."""
import sys
import types

import pytest
import torch

from moebench.arms import unsloth_runtime as arm


def test_preimport_sets_the_gpu_path_switch(monkeypatch):
    monkeypatch.delenv("UNSLOTH_FORCE_GPU_PATH", raising=False)
    monkeypatch.setitem(sys.modules, "unsloth", types.ModuleType("unsloth"))  # no GPU here: a stand-in
    arm.preimport_unsloth()
    import os

    assert os.environ["UNSLOTH_FORCE_GPU_PATH"] == "1"


@pytest.mark.parametrize("family", ["qwen3", "olmoe"])
def test_prewarm_calls_match_the_forward(family):
    if family == "qwen3":
        from transformers import Qwen3MoeConfig as C, Qwen3MoeForCausalLM as M
        cfg = C(vocab_size=64, hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)
    else:
        from transformers import OlmoeConfig as C, OlmoeForCausalLM as M
        cfg = C(vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, num_experts=8, num_experts_per_tok=2)
    calls = arm.moe_autotune_calls(M(cfg), torch.bfloat16)
    gate_up, down = calls
    assert gate_up == dict(num_experts=8, hidden_dim=64, intermediate_dim=48, top_k=2, dtype=torch.bfloat16)
    # the second GEMM: K = the experts' intermediate width, N = hidden (passed halved, as the autotuner doubles it)
    assert down == dict(num_experts=8, hidden_dim=48, intermediate_dim=32, top_k=2, dtype=torch.bfloat16)


def test_prewarm_skips_models_without_fused_experts():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=4))
    assert arm.moe_autotune_calls(dense, torch.bfloat16) == []


def test_prewarm_failure_is_recorded_not_raised(monkeypatch, capsys):
    """A prewarm that cannot run leaves the draw to Unsloth's own first-call tuning (whose fallback the console
    check still catches) instead of failing the draw."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    m = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                           moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2))
    monkeypatch.setattr(arm, "observe_backend", lambda: {"moe_backend_selected": "unsloth_triton"})
    out = arm.prewarm_if_triton(m)  # unsloth is not installed here: the import fails inside the prewarm
    assert "error" in out and "unsloth" in out["error"]
    assert "prewarm failed" in capsys.readouterr().out
    monkeypatch.setattr(arm, "observe_backend", lambda: {"moe_backend_selected": "grouped_mm"})
    assert arm.prewarm_if_triton(m) is None


def test_prewarm_reads_the_logical_shape_of_packed_4bit_experts():
    """bitsandbytes stores a 4-bit expert stack packed, (n, 1): its stored shape gives a zero width, so the calls
    use the logical shape (unsloth_zoo's _logical_expert_shape reads Params4bit._original_shape)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    m = Qwen3MoeForCausalLM(Qwen3MoeConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                           moe_intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=16, num_experts=8,
                                           num_experts_per_tok=2))
    experts = m.model.layers[0].mlp.experts
    logical = tuple(experts.gate_up_proj.shape)
    packed = torch.nn.Parameter(torch.zeros(experts.gate_up_proj.numel() // 2, 1, dtype=torch.uint8),
                                requires_grad=False)
    packed._original_shape = torch.Size(logical)
    experts.gate_up_proj = packed
    assert arm.moe_autotune_calls(m, torch.bfloat16) == []  # the stored shape: no usable width, no call
    calls = arm.moe_autotune_calls(m, torch.bfloat16, lambda p: p._original_shape)
    assert calls[0]["intermediate_dim"] == 48 and calls[1]["hidden_dim"] == 48
    # a declared input-major layout (E, K, 2I) is read from the last axis, as unsloth_zoo does
    declared = arm.moe_autotune_calls(m, torch.bfloat16, lambda p: p._original_shape, lambda _m: True)
    assert declared[0]["intermediate_dim"] == logical[-1] // 2
