"""What an arm is: one LoRA training stack that loads the saved model for training.

An arm has one job: load the model from disk for LoRA training and say what really happened (backend,
dtypes after load). Timing, memory and energy live in `measure`/`energy`, shared by all arms, so every
arm is measured by the same code.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LoRASpec:
    r: int = 64
    alpha: int = 64
    dropout: float = 0.0
    attention: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    experts: bool = True  # LoRA on every expert tensor too


@dataclass
class Loaded:
    model: Any  # a torch.nn.Module ready for training (trainable LoRA params, frozen base)
    info: dict = field(default_factory=dict)  # what really happened: backend, dtype census, notes


class ArmUnavailable(RuntimeError):
    """This arm cannot run here (no CUDA, package missing, model unsupported): a `skipped` row."""


class Arm:
    name = "base"  # canonical arm id used in rows and paths, e.g. "hf_bf16"
    stack = ""  # hf / unsloth / e4b
    precision = "bf16"  # bf16 / nf4
    needs_cuda = False
    packages: tuple[str, ...] = ()  # import names that must be present

    def unavailable_reason(self, cuda: bool) -> str | None:
        """Why this arm cannot run on this host, or None. Checked before any heavy import."""
        if self.needs_cuda and not cuda:
            return f"{self.name} needs CUDA (no GPU on this host)"
        for pkg in self.packages:
            if importlib.util.find_spec(pkg) is None:
                return f"{self.name} needs the Python package '{pkg}' (not installed)"
        return None

    def refusal(self, model_dir: str, plan: dict) -> str | None:
        """Why this arm will not train the checkpoint in `model_dir` (read from its files, cheaply), or None."""
        return None

    def preimport(self) -> None:
        """Import what must come before transformers (Unsloth patches it at import). Called first in the
        arm's process, before the harness imports transformers."""

    def load(self, model_dir: str, lora: LoRASpec, plan: dict) -> Loaded:
        """Load the saved model from `model_dir` and attach LoRA. `plan` is the tier plan (tier.json's
        `plan`: seq_len, batch, moe_backend, dtype, gradient_checkpointing, ...)."""
        raise NotImplementedError
