"""Shared measurement: timers, memory and the FLOP model (what was loaded: `inspect`).

Every arm is measured by this code, so arms differ only in how they load and run the model.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

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
    causal context (seq/2 for full layers, min(window, seq/2) for sliding ones).

    Model FLOPs (MFU's numerator) count the training step once, with no recompute. Hardware FLOPs (HFU's)
    add what gradient checkpointing recomputes: the decoder layers' forward once more (HF's and Unsloth's
    checkpointing wrap each decoder layer; the LM head runs once and is not recomputed). On a 4-bit arm the
    same FLOPs are counted: its matmuls run on dequantized bf16 tiles, so utilization is against the bf16 rate.
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

    def layer_active_params(self) -> int:
        """Frozen matmul parameters of the decoder layers a token passes through (attention, top-k experts,
        router): what checkpointing recomputes."""
        return self.layers * (self.attn_params() + self.active_expert_params() + self.hidden * self.experts)

    def head_params(self) -> int:
        return self.hidden * self.vocab

    def frozen_active_params(self) -> int:
        """Matmul parameters each token passes through (embedding lookup is no matmul; lm_head is)."""
        return self.layer_active_params() + self.head_params()

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

    def flops_per_token(self, seq: int, recompute: bool) -> float:
        """Training FLOPs per token: model FLOPs, plus the decoder layers' forward again with `recompute`."""
        attn = self.attention_flops_per_token(seq)
        fwd = 2 * self.frozen_active_params() + 2 * self.lora_active_params() + attn
        bwd = 2 * self.frozen_active_params() + 4 * self.lora_active_params() + 2 * attn
        layers_fwd = 2 * self.layer_active_params() + 2 * self.lora_active_params() + attn
        return fwd + bwd + (layers_fwd if recompute else 0)

    def step_flops(self, tokens: int, seq: int, recompute: bool) -> float:
        return tokens * self.flops_per_token(seq, recompute)


def recomputes(plan: dict) -> bool:
    """Does the plan's gradient checkpointing recompute the forward (any mode but off)?"""
    return bool(plan.get("gradient_checkpointing"))


def utilization(model_flops: float, hardware_flops: float, step_s: float, peak_tflops: float) -> dict:
    """MFU (model FLOPs, no recompute) and HFU (with recompute) of one step time against a peak rate."""
    if step_s <= 0 or peak_tflops <= 0:
        raise ValueError(f"utilization needs a positive step time and peak (got {step_s} s, {peak_tflops} TFLOP/s)")
    return {"mfu": model_flops / step_s / 1e12 / peak_tflops, "hfu": hardware_flops / step_s / 1e12 / peak_tflops}


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


# ---- steady warm-up ---------------------------------------------------------------------------------------
def variation(xs: list[float]) -> float:
    """(max - min) / median: how much a run of step times varies, as a fraction of its middle."""
    med = statistics.median(xs)
    return (max(xs) - min(xs)) / med if med > 0 else math.inf


@dataclass
class WarmupPolicy:
    """Warm up at least `min_steps`, then go on until the last `k` step times vary by less than `tol`
    (variation), never past `max_steps`. A first step that compiles or autotunes, or a kernel that settles
    late, stays out of the timed window."""

    min_steps: int
    max_steps: int
    k: int
    tol: float

    @classmethod
    def from_plan(cls, plan: dict) -> "WarmupPolicy":
        """Plan keys warmup_steps (the minimum), warmup_max, steady_k, steady_tol; a plan without the last three
        (an older tier.json) warms up exactly warmup_steps."""
        lo = int(plan["warmup_steps"])
        hi = max(lo, int(plan.get("warmup_max") or lo))
        k = int(plan.get("steady_k") or 3)
        if k < 2:
            raise ValueError(f"plan steady_k={k}: need at least 2 step times to judge steadiness (set >= 2)")
        return cls(lo, hi, k, float(plan.get("steady_tol", 0.05)))

    def steady(self, times: list[float]) -> bool:
        return len(times) >= self.k and variation(times[-self.k:]) < self.tol

    def more(self, times: list[float]) -> bool:
        """Take another warm-up step after these?"""
        n = len(times)
        return n < self.min_steps or (n < self.max_steps and not self.steady(times))

    def outcome(self, times: list[float]) -> tuple[bool, str]:
        """(steady, why not) once warm-up has ended."""
        if self.steady(times):
            return True, ""
        if len(times) < self.k:
            return False, f"{len(times)} warm-up steps, fewer than steady_k={self.k}: steadiness not judged"
        return False, (f"not steady after warmup_max={self.max_steps} steps: the last {self.k} varied "
                       f"{variation(times[-self.k:]):.1%} (steady_tol {self.tol:.1%})")


# ---- the timed window -------------------------------------------------------------------------------------
@dataclass
class WindowPolicy:
    """How long the timed window runs: at least `steps` steps AND `min_s` seconds AND (where energy is measured)
    `min_samples` power samples (ML.ENERGY's validation rule: >= 30 s, >= 60 samples), never past `max_steps`.
    A window that stops short of its floor says why (`shortfall`)."""

    steps: int
    min_s: float = 0.0
    min_samples: int = 0
    max_steps: int | None = None
    stall_s: float = 60.0  # power samples that never come (a failing sensor) cannot hold the window open

    @classmethod
    def from_plan(cls, plan: dict, arm: str = "") -> "WindowPolicy":
        """Plan keys timed_steps, min_timed_s, min_power_samples, max_timed_steps (all arms) and
        arm_max_timed_steps ({arm: cap}, a slow arm)."""
        caps = [c for c in (plan.get("max_timed_steps"), (plan.get("arm_max_timed_steps") or {}).get(arm)) if c]
        return cls(int(plan["timed_steps"]), float(plan.get("min_timed_s") or 0.0),
                   int(plan.get("min_power_samples") or 0), min(caps) if caps else None)

    def done(self, n: int, elapsed: float, samples: int | None) -> bool:
        """Stop after n timed steps, `elapsed` s of window and `samples` power samples (None: no meter)?"""
        if self.max_steps and n >= self.max_steps:
            return True
        if n < self.steps or elapsed < self.min_s:
            return False
        if samples is None or samples >= self.min_samples:
            return True
        return elapsed >= self.min_s + self.stall_s

    def shortfall(self, n: int, elapsed: float, samples: int | None) -> str:
        """Why a finished window falls short of the floor ("" when it does not)."""
        short = []
        if n < self.steps:
            short.append(f"{n} of timed_steps={self.steps} steps")
        if elapsed < self.min_s:
            short.append(f"{elapsed:.1f} s of min_timed_s={self.min_s:g}")
        if samples is not None and samples < self.min_samples:
            short.append(f"{samples} of min_power_samples={self.min_samples} power samples")
        if not short:
            return ""
        why = f"capped by max_timed_steps={self.max_steps}" if self.max_steps and n >= self.max_steps else \
            "power samples stalled" if samples is not None and samples < self.min_samples else "stopped early"
        return f"window short: {', '.join(short)} ({why})"


def write_steps(path, times: list[float], tokens_per_step: int) -> Path:
    """steps.csv: one row per timed step (step from 1, seconds, tokens), written atomically; the aggregate's
    hierarchical bootstrap resamples these within each draw."""
    import csv
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(STEPS_COLUMNS)
        w.writerows((i, repr(float(t)), tokens_per_step) for i, t in enumerate(times, 1))
    os.replace(tmp, path)
    return path


STEPS_COLUMNS = ("step", "seconds", "tokens")


# ---- GFLOP per token of each model shape (the report's method section) -----------------------------------
def gflop_per_token(cfg, seq: int, lora_r: int, lora_experts: bool = True) -> dict:
    """GFLOP per trained token at `seq`: model (MFU's numerator) and with checkpointing's recompute (HFU's)."""
    fm = FlopModel.from_config(cfg, lora_r, lora_experts)
    return {"model_gflop_per_token": fm.flops_per_token(seq, recompute=False) / 1e9,
            "hardware_gflop_per_token": fm.flops_per_token(seq, recompute=True) / 1e9,
            "active_params_b": (fm.frozen_active_params() + fm.lora_active_params()) / 1e9}


def flops_table(seq: int, lora_r: int, scale: str = "full", names: list[str] | None = None) -> str:
    """Markdown table of gflop_per_token for every model of config/models.yaml at `scale`."""
    from . import config as cfgmod
    from .shapes import model_config

    specs = cfgmod.load_yaml("models.yaml")
    lines = [f"| model ({scale}) | active matmul params (B) | GFLOP/token, model (MFU) | "
             f"GFLOP/token, with recompute (HFU) |", "|---|---:|---:|---:|"]
    for name in names or list(specs):
        g = gflop_per_token(model_config(specs[name], scale), seq, lora_r)
        lines.append(f"| {name} | {g['active_params_b']:.2f} | {g['model_gflop_per_token']:.2f} | "
                     f"{g['hardware_gflop_per_token']:.2f} |")
    lines.append(f"\nseq_len {seq}, LoRA r {lora_r} on attention and every expert; forward 2P, backward 4P "
                 f"(frozen) or 6P (LoRA), attention scores at mean causal context; recompute = decoder layers' "
                 f"forward once more.")
    return "\n".join(lines)


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="The FLOP model's GFLOP per token for each model shape.")
    ap.add_argument("--flops-table", action="store_true", help="print the markdown table")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--scale", default="full")
    ap.add_argument("--model", action="append", help="only these models.yaml entries (repeatable)")
    a = ap.parse_args(argv)
    if not a.flops_table:
        ap.error("nothing to do: pass --flops-table")
    print(flops_table(a.seq, a.lora_r, a.scale, a.model))


if __name__ == "__main__":
    main()
