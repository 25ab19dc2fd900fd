"""The arm registry: canonical arm id -> where its class lives. Modules are imported on demand; none imports a
GPU-only package at module level, so the registry works on any host."""
from __future__ import annotations

import importlib

from .base import Arm, ArmUnavailable, Loaded, LoRASpec

REGISTRY: dict[str, str] = {
    "hf_bf16": "hf:HFBf16",
    "hf_bnb4": "hf:HFBnb4",
    "unsloth_bf16": "unsloth:UnslothBF16",
    "unsloth_4bit": "unsloth:Unsloth4bit",
    "unsloth_fp8": "unsloth_fp8:UnslothFP8",
    "e4b_4bit": "e4b:E4B4bit",
}


class Broken(Arm):
    """An arm whose module failed to import: it runs as a `skipped` row that carries the import error."""

    def __init__(self, name: str, error: str):
        self.name, self.error = name, error
        self.precision = "nf4" if name.endswith(("4bit", "bnb4")) else "fp8" if name.endswith("fp8") else "bf16"

    def unavailable_reason(self, cuda: bool) -> str | None:
        return f"{self.name}: its module failed to import ({self.error})"


def get(name: str) -> Arm:
    if name not in REGISTRY:
        raise KeyError(f"unknown arm {name!r}; known arms: {sorted(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    try:
        arm = getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
    except (ImportError, AttributeError) as exc:
        return Broken(name, f"{type(exc).__name__}: {exc}")
    assert arm.name == name, f"registry maps {name} to {cls}, whose name is {arm.name}"
    return arm


__all__ = ["Arm", "ArmUnavailable", "Loaded", "LoRASpec", "REGISTRY", "get"]
