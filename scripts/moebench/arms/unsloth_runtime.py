"""What every Unsloth arm sets up in its own process: the switches before `import unsloth`, the MoE backend
Unsloth really selected, and its Triton MoE kernels tuned before the first step (not inside the compiled layer).
Shared by the Unsloth arms (bf16, 4-bit, FP8); nothing imports unsloth at module level."""
from __future__ import annotations

import os
import tempfile
import time


def preimport_unsloth() -> None:
    """Import unsloth before transformers/peft (it patches them), with the switches every Unsloth arm needs."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # offline: no stats ping
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # its compiled kernels go to a cache dir, not into the working directory (the repo under Snakemake)
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", os.path.join(tempfile.gettempdir(), "unsloth_compiled_cache"))
    # unsloth_zoo picks the MoE backend inside each compiled decoder layer on every call, and that pick probes for
    # Apple MLX with platform.system(), whose uname result TorchDynamo cannot rebuild: the per-layer compile fails
    # and Unsloth keeps the stock layer forward (Qwen3 on the H200, "block compile failed"). The probe reads this
    # switch first (unsloth_zoo.mlx.runtime.is_mlx_available) and answers "no MLX" without calling platform.
    os.environ.setdefault("UNSLOTH_FORCE_GPU_PATH", "1")
    import unsloth  # noqa: F401


def prewarm_moe_autotune(model) -> dict:
    """Tune Unsloth's Triton MoE kernels once, eagerly, before the first step.

    unsloth_zoo's forward_triton_grouped_gemm tunes at its first call; inside the compiled decoder layer that call
    is traced, Triton's Autotuner never sets best_config, and Unsloth logs "MoE kernel auto-tuning failed" and
    runs default configurations (Qwen3 on the H200). Tuning here fills the process-wide config cache that the
    traced call then reads, with the arguments that forward passes (its two GEMMs, the activations' bf16)."""
    import torch
    from unsloth.kernels.moe.autotune_cache import get_or_autotune_moe_kernels
    from unsloth_zoo.temporary_patches.moe_utils import _experts_are_input_major

    calls = moe_autotune_calls(model, _experts_are_input_major, torch.bfloat16)
    t0 = time.perf_counter()
    for kw in calls:
        get_or_autotune_moe_kernels(**kw)
    return {"calls": [{k: str(v) for k, v in kw.items()} for kw in calls],
            "seconds": round(time.perf_counter() - t0, 1)}


def prewarm_if_triton(model) -> dict | None:
    """The prewarm where Unsloth will run its Triton MoE kernels (GPT-OSS's interleaved gate/up runs grouped_mm)."""
    if model.config.model_type == "gpt_oss" or observe_backend().get("moe_backend_selected") != "unsloth_triton":
        return None
    try:
        return prewarm_moe_autotune(model)
    except Exception as exc:  # the draw goes on: Unsloth tunes at the first call as before, its console says how
        print(f"moebench: MoE autotune prewarm failed: {exc!r}", flush=True)
        return {"error": repr(exc)}


def moe_autotune_calls(model, input_major, dtype) -> list[dict]:
    """The two get_or_autotune_moe_kernels calls unsloth_zoo makes for the first fused-experts module (every
    layer of one model has the same shape): gate/up (K = hidden) and down (K = intermediate)."""
    experts = next((m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "num_experts")), None)
    if experts is None:
        return []
    hidden = int(model.config.hidden_size)
    shape = experts.gate_up_proj.shape
    inter = (shape[-1] if input_major(experts, "gate_up_proj", hidden) else shape[1]) // 2
    top_k = int(model.config.num_experts_per_tok)
    n = int(experts.num_experts)
    return [dict(num_experts=n, hidden_dim=hidden, intermediate_dim=inter, top_k=top_k, dtype=dtype),
            dict(num_experts=n, hidden_dim=inter, intermediate_dim=hidden // 2 if hidden % 2 == 0 else hidden,
                 top_k=top_k, dtype=dtype)]


def observe_backend() -> dict:
    """The MoE backend unsloth_zoo selected, and its GPT-OSS view (interleaved gate/up). Call after a step too:
    the grouped-QLoRA counters say whether the bnb experts ran grouped or fell back to the per-expert loop."""
    out = {}
    try:
        from unsloth_zoo.temporary_patches import moe_utils

        out["moe_backend_selected"] = moe_utils.select_moe_backend()
        out["moe_backend_gpt_oss"] = moe_utils.select_moe_backend_for_interleaved_gate_up()
    except Exception as exc:  # report, never guess
        out["moe_backend_error"] = repr(exc)
    try:
        from unsloth_zoo.temporary_patches import gpt_oss_grouped_qlora as gq

        out["grouped_qlora_calls"] = dict(gq.CALLS)
        out["grouped_qlora_last_decline"] = gq.LAST_DECLINE.get("reason")
    except Exception:
        pass
    return out
