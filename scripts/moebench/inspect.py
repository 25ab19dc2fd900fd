"""What really got loaded and trained, read from the model itself: the dtype census, the expert-LoRA coverage and
gradient check, the trainable summary. One implementation for every arm and stage, so "4-bit" or "LoRA on every
expert" means the same thing whichever stack loaded the model.
"""
from __future__ import annotations

import re
from collections import defaultdict

GB = 1e9
FOUR_BIT = ("nf4", "fp4", "uint8")  # storages of packed 4-bit codes (bnb Params4bit by quant_type, e4b uint8)
FLOAT = ("bfloat16", "float16", "float32")


def category(name: str) -> str:
    """lora / expert / attention / router / other, from a parameter's or buffer's qualified name."""
    if "lora_" in name:
        return "lora"
    if ".experts." in name or name.endswith(".experts") or "experts" in name.split("."):
        return "expert"
    if "self_attn" in name:
        return "attention"
    if "router" in name or ".gate." in name:
        return "router"
    return "other"


def role(name: str) -> str | None:
    """lora / norm / bias for the tensors whose dtype differs between stacks (None for the other weights)."""
    if "lora_" in name:
        return "lora"
    if any("norm" in part for part in name.split(".")[:-1]):  # input_layernorm.weight, model.norm.weight
        return "norm"
    if name.endswith("bias"):
        return "bias"
    return None


def storage(t, name: str = "") -> str:
    """How a tensor is stored: 'nf4'/'fp4' for a quantized bnb weight, `quant-meta` for absmax/quant maps
    (fp32 statistics beside packed 4-bit codes), else its torch dtype."""
    if "absmax" in name or "quant_map" in name:
        return "quant-meta"
    if type(t).__name__ == "Params4bit" or getattr(t, "quant_state", None) is not None:
        qs = getattr(t, "quant_state", None)
        if qs is None:
            return f"Params4bit-without-quant_state({str(t.dtype).replace('torch.', '')})"
        return getattr(qs, "quant_type", "4bit")
    return str(t.dtype).replace("torch.", "")


def census(model) -> dict:
    """Storage of every parameter and buffer by category and dtype: which weights were really quantized (a
    4-bit weight is stored as uint8 with a quant_state), whatever a flag said.

    Returns {"by_category": {cat: {storage: {"tensors", "numel", "bytes"}}}, "by_role": {lora|norm|bias:
    {dtype: numel}}, "experts_4bit": bool, "expert_float_bytes" (expert weights, biases excluded),
    "expert_4bit_bytes", "notes": [...]}."""
    by = defaultdict(lambda: defaultdict(lambda: {"tensors": 0, "numel": 0, "bytes": 0}))
    roles = defaultdict(lambda: defaultdict(int))
    notes, seen, expert_weight_float = [], set(), defaultdict(int)
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, t in named:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        st = storage(t, name)
        if st.startswith("Params4bit-without"):
            notes.append(f"no quant_state: {name}")
        cell = by[category(name)][st]
        cell["tensors"] += 1
        cell["numel"] += t.numel()
        cell["bytes"] += t.numel() * t.element_size()
        if role(name):
            roles[role(name)][st] += t.numel()
        elif category(name) == "expert" and st in FLOAT:  # expert weights, not their (always float) biases
            expert_weight_float[st] += t.numel() * t.element_size()
    four = {k: v for k, v in by.get("expert", {}).items() if k in FOUR_BIT}
    float_bytes, four_bytes = sum(expert_weight_float.values()), sum(v["bytes"] for v in four.values())
    return {
        "by_category": {c: dict(v) for c, v in by.items()},
        "by_role": {r: dict(v) for r, v in roles.items()},
        # "4-bit experts" means >= 99% of expert weight bytes are packed 4-bit codes (biases stay float by design)
        "experts_4bit": four_bytes > 0 and float_bytes <= 0.01 * (float_bytes + four_bytes),
        "expert_float_bytes": float_bytes,
        "expert_4bit_bytes": four_bytes,
        "notes": notes[:20] + ([f"... {len(notes) - 20} more"] if len(notes) > 20 else []),
    }


def weights_gb(c: dict, cat: str) -> float:
    """GB stored for one category of a census (quantization statistics included)."""
    return sum(v["bytes"] for v in c["by_category"].get(cat, {}).values()) / GB


def four_bit_fraction(c: dict, cat: str) -> float:
    """Share of a category's bytes held as packed 4-bit codes (0 when the category is absent)."""
    cells = c["by_category"].get(cat, {})
    total = sum(v["bytes"] for v in cells.values())
    return sum(v["bytes"] for k, v in cells.items() if k in FOUR_BIT) / total if total else 0.0


def role_dtypes(c: dict) -> dict[str, list[str]]:
    """The dtypes the LoRA factors, norms and biases are kept in: {"lora": ["float32"], "norm": [...], ...}."""
    return {r: sorted(v) for r, v in sorted(c.get("by_role", {}).items())}


def expert_lora_check(model) -> dict:
    """Do LoRA adapters sit on every expert tensor, and did each get a non-zero gradient? Call after backward."""
    expert_lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n and "expert" in n]
    layers = {n.split(".layers.")[1].split(".")[0] for n, _ in expert_lora if ".layers." in n}
    nonzero = [n for n, p in expert_lora if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    return {"expert_lora_tensors": len(expert_lora), "expert_lora_params": sum(p.numel() for _, p in expert_lora),
            "layers_with_expert_lora": len(layers), "expert_lora_nonzero_grad": len(nonzero)}


def expert_lora_coverage(model, num_layers: int) -> dict:
    """Which decoder layers carry trainable LoRA tensors on their experts, and on which projections."""
    # PEFT's target_parameters wrappers nest (experts.base_layer.lora_A...), so the name alone does not say
    # which tensor an adapter belongs to: read the wrapper's own `parameter_name`.
    owner = {}
    for mname, mod in model.named_modules():
        pname = getattr(mod, "parameter_name", None)
        if isinstance(pname, str):
            for n, _ in mod.named_parameters(prefix=mname):
                if n.startswith(mname + ".lora_"):
                    owner[n] = pname
    layers, per_expert = defaultdict(set), defaultdict(set)
    names = []
    for n, p in model.named_parameters():
        if not p.requires_grad or category(n) != "lora" or "experts" not in n:
            continue
        names.append(n)
        m = re.search(r"layers\.(\d+)\.", n)
        if m:
            src = owner.get(n, n)
            proj = "gate_up" if "gate_up" in src else "down" if "down" in src else "?"
            layers[int(m.group(1))].add(proj)
            e = re.search(r"(gate_up_projs|down_projs)\.(\d+)\.", n)
            if e:  # Unsloth's per-expert Linear layout: one adapter per expert
                per_expert[(int(m.group(1)), proj)].add(int(e.group(2)))
    covered = sorted(i for i, s in layers.items() if {"gate_up", "down"} <= s)
    out = {"layers_with_expert_lora": covered, "all_layers": covered == list(range(num_layers)),
           "projections": {i: sorted(s) for i, s in layers.items()}, "n_tensors": len(names),
           "example_names": names[:6]}
    if per_expert:
        out["experts_per_layer_proj"] = {f"{k[0]}.{k[1]}": len(v) for k, v in sorted(per_expert.items())}
    return out


def trainable_summary(model) -> dict:
    tr = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    non_lora = [n for n, _ in tr if category(n) != "lora"]
    return {"trainable_tensors": len(tr), "trainable_numel": sum(p.numel() for _, p in tr),
            "trainable_dtypes": sorted({str(p.dtype) for _, p in tr}), "non_lora_trainable": non_lora[:10]}


# ---- the conditions a draw really ran under ---------------------------------------------------------------
def checkpointing(model) -> dict:
    """Gradient checkpointing as applied: on how many modules, through which function and with what arguments
    (HF's non-reentrant torch checkpoint, Unsloth's offloaded variant, ...), read from the modules themselves."""
    on = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    if not on:
        return {"applied": False}
    fn = getattr(on[0], "_gradient_checkpointing_func", None)
    inner = getattr(fn, "func", fn)  # functools.partial(checkpoint, use_reentrant=False)
    name = f"{getattr(inner, '__module__', '')}.{getattr(inner, '__qualname__', type(inner).__name__)}" if inner \
        else None
    return {"applied": True, "modules": len(on), "function": name,
            "kwargs": {k: repr(v) for k, v in (getattr(fn, "keywords", None) or {}).items()}}


def conditions(model, c: dict, plan: dict) -> dict:
    """What differs between stacks besides the one thing compared: attention implementation (the model's
    config, and Unsloth's flex-attention switch), checkpointing as applied, and the dtypes LoRA factors, norms
    and biases are kept in (from the census `c`)."""
    import os

    cfg = getattr(model, "config", None)
    attention = {"implementation": getattr(cfg, "_attn_implementation", None), "requested": plan.get("hf_attention")}
    if "UNSLOTH_ENABLE_FLEX_ATTENTION" in os.environ:
        attention["UNSLOTH_ENABLE_FLEX_ATTENTION"] = os.environ["UNSLOTH_ENABLE_FLEX_ATTENTION"]
    return {"attention": attention,
            "gradient_checkpointing": {"requested": plan.get("gradient_checkpointing"), **checkpointing(model)},
            "dtypes": role_dtypes(c)}


def compiled() -> dict:
    """torch.compile at work in this process so far: frames TorchDynamo compiled and graphs it built (0 when
    nothing compiled; Unsloth compiles its layers, the transformers arms do not unless asked)."""
    import sys

    utils = sys.modules.get("torch._dynamo.utils")
    counters = getattr(utils, "counters", None)
    if counters is None:
        return {"compiled": False, "frames": 0, "graphs": 0}
    frames, graphs = int(counters["frames"]["ok"]), int(counters["stats"]["unique_graphs"])
    return {"compiled": frames > 0, "frames": frames, "graphs": graphs}
