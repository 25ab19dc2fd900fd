"""Unsloth arms: Split LoRA on bf16 grouped experts (`unsloth_bf16`) and QLoRA on bnb nf4 (`unsloth_4bit`).

Loaded the way Unsloth's users load them: `FastLanguageModel.from_pretrained` then `get_peft_model` with
the usual target_modules list; Unsloth itself turns gate/up/down into PEFT `target_parameters` on the fused
expert tensors (bf16) or into per-expert Linear4bit targets (its bnb GPT-OSS layout). Nothing here imports
unsloth at module level: importing it patches transformers, so it happens in `preimport` in the arm's own
process, before the harness imports transformers.

What really ran is recorded, not assumed: the MoE backend Unsloth selected (GPT-OSS's interleaved gate/up
cannot run on the `unsloth_triton` kernels; unsloth_zoo maps that request to `grouped_mm`), and a dtype
census of the weights after load (on a bf16 checkpoint `load_in_4bit` may leave the experts in bf16).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..inspect import census, expert_lora_coverage, trainable_summary
from ..io import package_versions
from .base import Arm, ArmUnavailable, Loaded, LoRASpec
from .unsloth_runtime import apply_switches, observe_backend, preimport_unsloth, prewarm_if_triton

# Unsloth's own default; get_peft_model maps gate/up/down onto the expert tensors of a MoE.
EXPERT_TARGETS = ("gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------- the arms
class _UnslothArm(Arm):
    stack = "unsloth"
    needs_cuda = True
    packages = ("unsloth", "unsloth_zoo", "peft")
    four_bit = False

    def preimport(self) -> None:
        preimport_unsloth()

    def checkpoint(self, model_dir: str, plan: dict) -> str:
        """What to load: GPT-OSS in 4-bit needs Unsloth's per-expert bnb layout (made by `make-bnb4`)."""
        if not (self.four_bit and has_fused_gptoss_experts(model_dir)) or plan.get("unsloth_4bit_from_fused_bf16"):
            return model_dir  # the flag reproduces the failure on purpose (experts/router newly initialized)
        return plan.get("unsloth_bnb4_dir") or bnb4_dir_for(model_dir)

    def refusal(self, model_dir: str, plan: dict) -> str | None:
        source = self.checkpoint(model_dir, plan)
        if source == model_dir:
            return None
        checked = Path(source.rstrip("/") + ".check.json")  # rule model_bnb4's record (moebench.quantcheck)
        if checked.exists():
            doc = json.loads(checked.read_text())
            if not doc.get("passed"):
                return (f"{self.name}: the pre-quantized checkpoint {source} failed its check against the bf16 "
                        f"model, so it is not timed: {'; '.join(doc.get('problems', []))[:400]}")
        if has_any_weights(source):
            return None
        return (f"{self.name}: {model_dir} stores GPT-OSS experts fused (transformers layout); Unsloth's 4-bit "
                "GPT-OSS class reads per-expert Linear keys, so load_in_4bit=True on it leaves every expert and "
                "the router newly initialized (bf16, 'no quant_state found', NaN loss). Make the pre-quantized "
                f"checkpoint first: python -m moebench.arms.unsloth make-bnb4 {model_dir} {source}")

    def load(self, model_dir: str, lora: LoRASpec, plan: dict) -> Loaded:
        import torch

        requested, switches = apply_switches(plan)
        from unsloth import FastLanguageModel

        kw = dict(load_in_4bit=True) if self.four_bit else dict(load_in_4bit=False, load_in_16bit=True)
        why = self.refusal(model_dir, plan)
        if why:
            raise ArmUnavailable(why)
        source = self.checkpoint(model_dir, plan)
        model, _tok = FastLanguageModel.from_pretrained(
            model_name=source, max_seq_length=int(plan.get("seq_len", 2048)), dtype=torch.bfloat16,
            full_finetuning=False, local_files_only=True, **kw)
        info = {"loader": f"FastLanguageModel.from_pretrained({kw})", "moe_backend_requested": requested,
                "checkpoint": source, "unsloth_env": switches}
        info["census_after_load"] = census(model)
        info["moe_autotune_prewarm"] = prewarm_if_triton(model)
        gc = plan.get("gradient_checkpointing", "unsloth")
        targets = list(lora.attention) + (list(EXPERT_TARGETS) if lora.experts else [])
        model = FastLanguageModel.get_peft_model(
            model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
            bias="none", use_gradient_checkpointing=(gc if gc else False), random_state=3407)
        info["target_modules"] = targets
        info["target_parameters"] = list(getattr(model.peft_config["default"], "target_parameters", None) or [])
        info.update(observe_backend())
        info["census_after_peft"] = census(model)
        n_layers = int(getattr(model.config, "num_hidden_layers", 0))
        info["expert_lora"] = expert_lora_coverage(model, n_layers)
        info["trainable"] = trainable_summary(model)
        info["versions"] = package_versions(("unsloth", "unsloth_zoo", "transformers", "peft", "torch", "bitsandbytes",
                                             "triton"))
        if self.four_bit and not info["census_after_load"]["experts_4bit"]:
            info.setdefault("warnings", []).append(
                "experts are NOT 4-bit after load_in_4bit=True (see census_after_load)")
        return Loaded(model, info)


# ---------------------------------------------------------------- the pre-quantized GPT-OSS checkpoint
def _weight_keys(model_dir) -> list[str]:
    from pathlib import Path

    from safetensors import safe_open

    keys = []
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            keys += list(h.keys())
    return keys


def has_any_weights(model_dir) -> bool:
    from pathlib import Path

    return Path(model_dir).is_dir() and any(Path(model_dir).glob("*.safetensors"))


def has_fused_gptoss_experts(model_dir) -> bool:
    return any(k.endswith("mlp.experts.gate_up_proj") for k in _weight_keys(model_dir))


def bnb4_dir_for(model_dir) -> str:
    return str(model_dir).rstrip("/") + "-unsloth-bnb4"


def make_bnb4_checkpoint(src: str, dst: str, max_seq_length: int = 2048) -> dict:
    """Quantize once and save, in the layout of Unsloth's published `-unsloth-bnb-4bit` GPT-OSS checkpoints.

    Unsloth's 4-bit GPT-OSS class keeps each expert as its own Linear (`experts.gate_up_projs.<e>`,
    `down_projs.<e>`) and the router as `router.linear`, so transformers' fused checkpoint does not fill it.
    This loads the model the way Unsloth does (load_in_4bit=True), fills those modules from the fused tensors
    (expert e's Linear weight is the transpose of gate_up_proj[e] / down_proj[e]; biases as stored), quantizes
    each expert with the same bitsandbytes Params4bit settings Unsloth's own Linear4bit modules carry, and
    saves with save_pretrained: no bf16 per-expert copy on disk. Needs CUDA and unsloth (imported first)."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401
    import torch
    from bitsandbytes.nn import Params4bit
    from safetensors import safe_open
    from unsloth import FastLanguageModel
    from pathlib import Path

    model, tok = FastLanguageModel.from_pretrained(model_name=src, max_seq_length=max_seq_length, dtype=torch.bfloat16,
                                                   load_in_4bit=True, local_files_only=True)
    where = {}
    for f in sorted(Path(src).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                where[k] = f

    def get(key):
        with safe_open(str(where[key]), framework="pt", device="cuda") as h:
            return h.get_tensor(key)

    n = 0
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            pre = f"model.layers.{i}.mlp."
            ex, router = layer.mlp.experts, layer.mlp.router
            router.linear.weight.data = get(pre + "router.weight").to(router.linear.weight.dtype)
            router.linear.bias.data = get(pre + "router.bias").to(router.linear.bias.dtype)
            for leaf, fused in (("gate_up_projs", "gate_up_proj"), ("down_projs", "down_proj")):
                w_all, b_all = get(pre + "experts." + fused), get(pre + "experts." + fused + "_bias")
                for e, lin in enumerate(getattr(ex, leaf)):
                    old = lin.weight
                    p = Params4bit(w_all[e].t().contiguous().to(torch.bfloat16), requires_grad=False,
                                   quant_type=getattr(old, "quant_type", "nf4"),
                                   compress_statistics=getattr(old, "compress_statistics", True),
                                   blocksize=getattr(old, "blocksize", 64),
                                   quant_storage=getattr(old, "quant_storage", torch.uint8), module=lin)
                    lin.weight = p._quantize("cuda")
                    lin.bias.data = b_all[e].to(lin.bias.dtype)
                    n += 1
                del w_all, b_all
    torch.cuda.empty_cache()
    report = {"experts_quantized": n, "census": census(model), "src": src}
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return report


class UnslothBF16(_UnslothArm):
    name = "unsloth_bf16"
    precision = "bf16"


class Unsloth4bit(_UnslothArm):
    name = "unsloth_4bit"
    precision = "nf4"
    packages = _UnslothArm.packages + ("bitsandbytes",)
    four_bit = True


ARMS = (UnslothBF16, Unsloth4bit)
__all__ = ["UnslothBF16", "Unsloth4bit", "observe_backend", "ArmUnavailable"]


def main(argv=None):
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Make the pre-quantized Unsloth bnb-4bit GPT-OSS checkpoint.")
    ap.add_argument("cmd", choices=["make-bnb4"])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--max-seq-length", type=int, default=2048)
    a = ap.parse_args(argv)
    print(json.dumps(make_bnb4_checkpoint(a.src, a.dst, a.max_seq_length), indent=1, default=str))


if __name__ == "__main__":
    main()
