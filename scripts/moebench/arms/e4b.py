"""experts4bit-qlora arm (`e4b_4bit`): experts stored NF4 by e4b, LoRA on experts and attention.

Qwen3-MoE and OLMoE (e4b's home ground) load through e4b's own streaming loader, which quantizes each fused
expert stack to NF4 and wraps it in `ExpertsLoRA`; training then takes the fused grouped-nf4-gemm path when
`enable_fast_train` accepts the stacks (recorded). GPT-OSS is the special case below.

What e4b 0.58.1 does for GPT-OSS, read from its source (loader.py, arch/gptoss.py, lora.py, engines/fast.py):
- Its streaming loader `load_moe_4bit_streaming` handles GPT-OSS only in the RELEASED layout (MXFP4
  `*_blocks`/`*_scales` on disk): it dequantizes the MXFP4 bytes, then `GptOssExperts4bit.from_gptoss`
  transposes to [E, 2I, H], de-interleaves gate/up and NF4-quantizes. A bf16 checkpoint saved by
  transformers (fused `gate_up_proj` [E, H, 2I], interleaved) is not that layout, so this arm builds the same
  `GptOssExperts4bit.from_gptoss` stacks itself from the bf16 tensors: the same bytes the loader would
  quantize after its dequant step, without an extra MXFP4 rounding, so the weights match the other arms'.
  A checkpoint that does carry MXFP4 blocks goes through e4b's own loader.
- Expert LoRA on GPT-OSS is opt-in (`E4B_GPTOSS_EXPERT_LORA=1`): it wraps each stack in `ExpertsLoRA`,
  whose unfused per-expert reference loop dequantizes one expert at a time (bitsandbytes dequant + matmul,
  recomputed in backward) and applies the biases and clamped GLU itself. Without it the experts are built
  bare (no expert adapters). The fused grouped-nf4-gemm path (`enable_fast_train`) refuses a stack with
  biases, so on GPT-OSS no fused kernel runs in training; `load` records the refusal verbatim.
"""
from __future__ import annotations

import os

from .base import Arm, Loaded, LoRASpec
from ..inspect import census, expert_lora_coverage, trainable_summary
from ..io import package_versions


def model_type(model_dir: str) -> str:
    import json
    from pathlib import Path

    return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type", "")


def _has_mxfp4_blocks(model_dir: str) -> bool:
    import json
    from pathlib import Path

    d = Path(model_dir)
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        keys = json.loads(idx.read_text())["weight_map"]
    else:
        from safetensors import safe_open

        keys = []
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as h:
                keys += list(h.keys())
    return any(k.endswith("gate_up_proj_blocks") for k in keys)


def quantize_bf16_gptoss_experts(model, r: int, alpha: int, lora_dtype, wrap: bool, device: str = "cuda") -> int:
    """Replace every `mlp.experts` (transformers GptOssExperts, bf16) with e4b's NF4 `GptOssExperts4bit`,
    optionally wrapped in `ExpertsLoRA`, one layer at a time so only one bf16 layer sits on the GPU."""
    import torch
    from experts4bit_qlora.arch.gptoss import GptOssExperts4bit
    from experts4bit_qlora.lora import ExpertsLoRA

    n = 0
    for layer in model.model.layers:
        ex = layer.mlp.experts
        with torch.no_grad():
            new = GptOssExperts4bit.from_gptoss(
                ex.gate_up_proj.data.to(device), ex.gate_up_proj_bias.data.to(device),
                ex.down_proj.data.to(device), ex.down_proj_bias.data.to(device),
                alpha=float(getattr(ex, "alpha", 1.702)), limit=float(getattr(ex, "limit", 7.0)),
                quant_type="nf4", compute_dtype=torch.bfloat16).to(device)
        if wrap:
            new = ExpertsLoRA(new, r=r, alpha=alpha, dtype=lora_dtype).to(device)
        layer.mlp.experts = new
        del ex
        n += 1
    return n


class E4B4bit(Arm):
    name = "e4b_4bit"
    stack = "e4b"
    precision = "nf4"
    needs_cuda = True
    packages = ("experts4bit_qlora", "bitsandbytes", "nf4_grouped")  # nf4_grouped: grouped-nf4-gemm

    def load(self, model_dir: str, lora: LoRASpec, plan: dict) -> Loaded:
        import torch

        if lora.experts:
            os.environ["E4B_GPTOSS_EXPERT_LORA"] = "1"  # read by e4b's loader; our bf16 route follows it too
        wrap = os.environ.get("E4B_GPTOSS_EXPERT_LORA", "0") == "1"
        import experts4bit_qlora as e4b
        from experts4bit_qlora.lora import add_attention_lora, trainable_lora_param_ids

        lora_dtype = torch.float32  # e4b's ExpertsLoRA default and PEFT's default adapter dtype
        info = {"expert_lora_env": os.environ.get("E4B_GPTOSS_EXPERT_LORA"), "lora_dtype": str(lora_dtype)}
        family = model_type(model_dir)
        if family != "gpt_oss" or _has_mxfp4_blocks(model_dir):
            # e4b's home ground (Qwen3-MoE, OLMoE): its streaming loader quantizes each fused expert stack to NF4
            # on the way to the GPU and wraps it in ExpertsLoRA, so the bf16 model never sits on the GPU.
            model, _ = e4b.load_moe_4bit_streaming(model_dir, "cuda", torch.bfloat16, lora.r, lora.alpha,
                                                   quant_type="nf4")
            info["route"] = ("load_moe_4bit_streaming (MXFP4 checkpoint: dequant -> NF4)" if family == "gpt_oss"
                             else f"load_moe_4bit_streaming ({family} bf16 checkpoint -> NF4 + ExpertsLoRA)")
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cpu")
            n = quantize_bf16_gptoss_experts(model, lora.r, lora.alpha, lora_dtype, wrap)
            info["route"] = (f"bf16 checkpoint: GptOssExperts4bit.from_gptoss on {n} layers"
                             + (" + ExpertsLoRA" if wrap else " (bare, no expert LoRA)"))
        model.to("cuda")
        n_attn = add_attention_lora(model, lora.r, lora.alpha, lora_dtype) if lora.attention else 0
        exp_ids, attn_ids = trainable_lora_param_ids(model)
        for _, p in model.named_parameters():
            p.requires_grad_(id(p) in exp_ids or id(p) in attn_ids)
        gc = plan.get("gradient_checkpointing", True)
        if gc:
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:  # the fused grouped-nf4-gemm training path (refuses GPT-OSS's biased experts, takes Qwen3/OLMoE's)
            info["fast_train_patched"] = e4b.enable_fast_train(model, dgrad=True)
        except Exception as exc:
            info["fast_train_refused"] = f"{type(exc).__name__}: {exc}"[:600]
        info["attention_lora_projections"] = n_attn
        info["expert_backend"] = ("grouped-nf4-gemm fused" if info.get("fast_train_patched")
                                  else "e4b unfused per-expert loop (bnb dequant + matmul)")
        info["census"] = census(model)
        info["expert_lora"] = expert_lora_coverage(model, int(model.config.num_hidden_layers))
        info["trainable"] = trainable_summary(model)
        try:
            e4b.verify_moe_4bit(model, strict=True)
            info["verify_moe_4bit"] = "ok"
        except Exception as exc:
            info["verify_moe_4bit"] = f"{type(exc).__name__}: {exc}"[:400]
        info["versions"] = package_versions(("experts4bit-qlora", "grouped-nf4-gemm", "bitsandbytes", "transformers",
                                             "torch", "triton"))
        return Loaded(model, info)


ARMS = (E4B4bit,)
