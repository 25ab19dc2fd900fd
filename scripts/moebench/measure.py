"""Shared measurement: timers, memory and the FLOP model (what was loaded: `inspect`).

Every arm is measured by this code, so arms differ only in how they load and run the model.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

GB = 1e9


# ---- timing -----------------------------------------------------------------------------------------------
class StepTimer:
    """Times one region: CUDA events on a GPU (no host sync inside the region), perf_counter on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.times: list[float] = []

    def __enter__(self):
        if self.cuda:
            import torch

            self._a, self._b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._a.record()
        else:
            self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            import torch

            self._b.record()
            torch.cuda.synchronize()
            self.times.append(self._a.elapsed_time(self._b) / 1e3)
        else:
            self.times.append(time.perf_counter() - self._t)


def summary(xs: list[float]) -> dict:
    """Median and interquartile range (robust to the odd slow step)."""
    if not xs:
        raise ValueError("no samples")
    s = sorted(xs)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
    return {"median": statistics.median(s), "iqr": q[2] - q[0], "n": len(s), "min": s[0], "max": s[-1]}


# ---- memory -----------------------------------------------------------------------------------------------
def memory_now(cuda: bool) -> dict:
    """Allocated/reserved by torch, used on the device by NVML (all processes), or host RSS on CPU."""
    if cuda:
        import torch

        out = {"alloc_gb": torch.cuda.memory_allocated() / GB, "reserved_gb": torch.cuda.memory_reserved() / GB}
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            out["nvml_used_gb"] = pynvml.nvmlDeviceGetMemoryInfo(h).used / GB
        except Exception:
            pass
        return out
    import psutil

    return {"rss_gb": psutil.Process().memory_info().rss / GB}


def memory_peak(cuda: bool) -> dict:
    if cuda:
        import torch

        return {"peak_alloc_gb": torch.cuda.max_memory_allocated() / GB,
                "peak_reserved_gb": torch.cuda.max_memory_reserved() / GB}
    import resource

    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB}


# ---- FLOP model -------------------------------------------------------------------------------------------
@dataclass
class FlopModel:
    """FLOPs of one LoRA training step of a top-k MoE (GPT-OSS, Qwen3-MoE, OLMoE), written out so a reader can check it.

    Per token and matmul weight of P parameters: forward 2P; backward 2P for the input gradient; a further
    2P for the weight gradient only where the weight trains (the LoRA factors). Frozen base weights therefore
    cost 4P, LoRA weights 6P. Only the top-k routed experts count as active. Attention scores (QK^T and AV)
    add 4 * ctx * heads * head_dim per token and layer forward and twice that backward, where ctx is the mean
    causal context (seq/2 for full layers, min(window, seq/2) for sliding ones). Gradient checkpointing
    recomputes the forward once more.
    """

    layers: int
    hidden: int
    inter: int
    experts: int
    top_k: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    window: int
    sliding_layers: int
    lora_r: int
    lora_experts: bool

    @classmethod
    def from_config(cls, cfg, lora_r: int, lora_experts: bool = True) -> "FlopModel":
        from .routing import moe_shape

        m = moe_shape(cfg)
        return cls(m["layers"], m["hidden"], m["expert_inter"], m["experts"], m["top_k"], m["heads"], m["kv_heads"],
                   m["head_dim"], m["vocab"], m["window"], m["sliding_layers"], lora_r, lora_experts)

    def attn_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * q + 2 * self.hidden * kv + q * self.hidden

    def active_expert_params(self) -> int:
        return self.top_k * (self.hidden * 2 * self.inter + self.inter * self.hidden)

    def frozen_active_params(self) -> int:
        """Matmul parameters each token passes through (embedding lookup is no matmul; lm_head is)."""
        per_layer = self.attn_params() + self.active_expert_params() + self.hidden * self.experts
        return self.layers * per_layer + self.hidden * self.vocab

    def lora_active_params(self) -> int:
        r, q, kv = self.lora_r, self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = r * ((self.hidden + q) + 2 * (self.hidden + kv) + (q + self.hidden))
        experts = self.top_k * r * ((self.hidden + 2 * self.inter) + (self.inter + self.hidden))
        return self.layers * (attn + (experts if self.lora_experts else 0))

    def attention_flops_per_token(self, seq: int) -> float:
        full = self.layers - self.sliding_layers
        ctx_full, ctx_slide = seq / 2, min(self.window or seq, seq / 2)
        per = 4 * self.heads * self.head_dim
        return per * (full * ctx_full + self.sliding_layers * ctx_slide)

    def step_flops(self, tokens: int, seq: int, recompute: bool) -> float:
        fwd = 2 * self.frozen_active_params() + 2 * self.lora_active_params() + self.attention_flops_per_token(seq)
        bwd = 2 * self.frozen_active_params() + 4 * self.lora_active_params() + 2 * self.attention_flops_per_token(seq)
        return tokens * (fwd + bwd + (fwd if recompute else 0))


def matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    """The card's bf16 matmul rate measured now (random inputs, CUDA events, median of reps)."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t = StepTimer(cuda=True)
    for _ in range(reps):
        with t:
            a @ b
    return 2 * n**3 / summary(t.times)["median"] / 1e12
