"""transformers 5 + PEFT: what most users would write. LoRA on attention (target_modules) and on the fused
3-D expert tensors (PEFT `target_parameters`)."""
from __future__ import annotations

from .base import Arm, ArmUnavailable, Loaded, LoRASpec

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def use_grouped_mm(model, plan: dict) -> str | None:
    """transformers 5's fused MoE path on a GPU, also when the tier asks Unsloth for its own Triton kernels.
    Returns "grouped_mm" when set, None when the model keeps its default (CPU, or no such switch)."""
    import torch

    if plan.get("moe_backend") in ("grouped_mm", "unsloth_triton") and torch.cuda.is_available() and \
            hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("grouped_mm")
        return "grouped_mm"
    return None


def peft_config(lora: LoRASpec):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=list(lora.attention),
                      target_parameters=EXPERT_PARAMS if lora.experts else None, task_type="CAUSAL_LM")


class HFBf16(Arm):
    name, stack, precision = "hf_bf16", "hf", "bf16"
    packages = ("transformers", "peft")

    def quantization(self):
        return None

    def load(self, model_dir: str, lora: LoRASpec, plan: dict) -> Loaded:
        import torch
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        cuda = torch.cuda.is_available()
        # load_on="cpu": the expert-offload mode streams experts from host memory, so load there first
        kwargs = {"dtype": torch.bfloat16, "device_map": plan.get("load_on") or ("cuda" if cuda else "cpu")}
        if self.quantization() is not None:
            kwargs["quantization_config"] = self.quantization()
        if plan.get("hf_attention"):  # e.g. the flex attention the Unsloth arms run, to separate that effect
            kwargs["attn_implementation"] = plan["hf_attention"]
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        except ValueError as exc:  # transformers refuses an attention implementation this model lacks
            if "attn_implementation" not in kwargs or "attention implementation" not in str(exc):
                raise
            raise ArmUnavailable(f"{self.name}: plan hf_attention={kwargs['attn_implementation']} is not supported "
                                 f"for this model by transformers ({str(exc).splitlines()[0][:200]})") from exc
        info = {"experts_implementation": use_grouped_mm(model, plan) or
                getattr(model.config, "_experts_implementation", None)}
        if plan.get("gradient_checkpointing"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model = get_peft_model(model, peft_config(lora))
        info["gradient_checkpointing"] = bool(plan.get("gradient_checkpointing"))
        return Loaded(model, info)


class HFBnb4(HFBf16):
    """bitsandbytes nf4 via BitsAndBytesConfig(load_in_4bit=True). The census shows what was really quantized:
    bitsandbytes replaces nn.Linear only, so GPT-OSS's fused 3-D expert tensors stay bf16 (bitsandbytes #1849)."""

    name, precision = "hf_bnb4", "nf4"
    needs_cuda = True
    packages = ("transformers", "peft", "bitsandbytes")

    def quantization(self):
        import torch
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)
