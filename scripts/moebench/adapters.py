"""The adapter's round trip: save it as a user would (PEFT's save_pretrained, or the trainable tensors of an arm
with its own LoRA), read it back, reload it onto the base model and probe the logits and router picks on both
sides. Shared so the validate stage holds only the run and its gates (the reload gate compares what these give).
"""
from __future__ import annotations

import math
from pathlib import Path

from . import routing


def logits_of(model, x):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits.float().cpu()


def probe(model, x) -> tuple:
    """(logits, each router's sorted top-k expert set per token) of one forward in eval mode."""
    load = routing.RouterLoad.of(model)
    load.keeping = True
    try:
        return logits_of(model, x), load.picks
    finally:
        load.remove()


def next_token_loss(logits, x) -> float:
    import torch

    return float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:].cpu()))


def save_adapter(model, out: Path) -> str:
    """PEFT models save their adapter (save_pretrained); a model with its own LoRA modules (e4b) saves its
    trainable tensors."""
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config") and hasattr(model, "save_pretrained"):
        model.save_pretrained(str(out))
        return "peft"
    from safetensors.torch import save_file

    save_file({n: p.detach().contiguous().cpu() for n, p in adapter_state(model).items()},
              str(out / "trainable.safetensors"))
    return "trainable-state"


def adapter_state(model) -> dict:
    """The adapter tensors under the names they are saved with (PEFT's own mapping for PEFT models)."""
    if hasattr(model, "peft_config"):
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def saved_adapter(adapter: Path) -> dict:
    if (adapter / "adapter_config.json").exists():
        from peft.utils import load_peft_weights

        return load_peft_weights(str(adapter), device="cpu")
    from safetensors.torch import load_file

    return load_file(str(adapter / "trainable.safetensors"))


def adapter_max_diff(live: dict, saved: dict) -> float:
    """Max |live - saved| over every saved tensor (values compared in float32, dtypes must match too); inf when a
    tensor is missing on either side or differs in shape or dtype."""
    if set(live) != set(saved):
        return math.inf
    worst = 0.0
    for k, t in saved.items():
        v = live[k].detach()
        if v.shape != t.shape or v.dtype != t.dtype:
            return math.inf
        worst = max(worst, float((v.float() - t.to(v.device).float()).abs().max()) if t.numel() else 0.0)
    return worst


def reload_model(arm, model_dir: str, adapter: Path, saved: dict, lora, plan: dict, x, log) -> dict:
    """Load the saved adapter as a user would and probe it: {"fresh": logits before the adapter is loaded,
    "logits", "picks", "adapter_diff": reloaded adapter vs the saved file, "how"}. hf arms:
    PeftModel.from_pretrained on the saved base model; other PEFT arms: the arm loads the base its own way, then
    PEFT loads the saved weights into it; others: the arm loads, then its trainable tensors are loaded."""
    import torch

    cuda = torch.cuda.is_available()
    if (adapter / "adapter_config.json").exists() and arm.stack == "hf":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from .arms.hf import use_grouped_mm

        kw = {"dtype": torch.bfloat16, "device_map": "cuda" if cuda else "cpu"}
        q = arm.quantization() if hasattr(arm, "quantization") else None
        if q is not None:
            kw["quantization_config"] = q
        base = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
        use_grouped_mm(base, plan)  # as the arm trained it
        fresh = logits_of(base, x)
        model = PeftModel.from_pretrained(base, str(adapter))
        how = "PeftModel.from_pretrained"
    else:
        model = arm.load(model_dir, lora, plan).model
        fresh = logits_of(model, x)
        if (adapter / "adapter_config.json").exists():
            from peft.utils import set_peft_model_state_dict

            res = set_peft_model_state_dict(model, saved)
            if res.unexpected_keys:
                raise RuntimeError(f"adapter keys the reloaded model does not have: {res.unexpected_keys[:5]}")
            how = f"{arm.name} load + set_peft_model_state_dict ({len(saved)} tensors)"
        else:
            res = model.load_state_dict(saved, strict=False)
            if res.unexpected_keys:
                raise RuntimeError(f"saved tensors the reloaded model does not have: {res.unexpected_keys[:5]}")
            how = f"{arm.name} load + load_state_dict ({len(saved)} trainable tensors)"
    log.info("reloaded the adapter: %s", how)
    logits, picks = probe(model, x)
    out = {"fresh": fresh, "logits": logits, "picks": picks, "how": how,
           "adapter_diff": adapter_max_diff(adapter_state(model), saved)}
    del model
    return out
