"""What every Unsloth arm sets up in its own process: the switches before `import unsloth`, the MoE backend
Unsloth really selected, and its Triton MoE kernels tuned before the first step (not inside the compiled layer).
Shared by the Unsloth arms (bf16, 4-bit, FP8); nothing imports unsloth at module level."""
from __future__ import annotations

import os
import tempfile
import time


# unsloth_zoo picks the MoE backend inside each compiled decoder layer on every call, and that pick probes for
# Apple MLX with platform.system(), whose uname result TorchDynamo cannot rebuild: the per-layer compile fails
# and Unsloth keeps the stock layer forward (Qwen3 on the H200, "block compile failed"). The probe reads this
# switch first (unsloth_zoo.mlx.runtime.is_mlx_available) and answers "no MLX" without calling platform.
# The recipe's Unsloth snippets set the same switches, so a pasted snippet runs what was measured.
IMPORT_SWITCHES = {"UNSLOTH_FORCE_GPU_PATH": "1"}


def preimport_unsloth() -> None:
    """Import unsloth before transformers/peft (it patches them), with the switches every Unsloth arm needs."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")  # offline: no stats ping
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # its compiled kernels go to a cache dir, not into the working directory (the repo under Snakemake)
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", os.path.join(tempfile.gettempdir(), "unsloth_compiled_cache"))
    for k, v in IMPORT_SWITCHES.items():
        os.environ.setdefault(k, v)
    import unsloth  # noqa: F401


def run_env(plan: dict) -> dict[str, str]:
    """Unsloth's own switches a run sets in its plan (`unsloth_env`), e.g. UNSLOTH_BLOCK_MOE=outside to keep
    the experts out of the per-layer torch.compile region (the schema allows UNSLOTH_* names only)."""
    return {str(k): str(v) for k, v in (plan.get("unsloth_env") or {}).items()}


def apply_switches(plan: dict) -> tuple[str, dict[str, str]]:
    """Set the plan's Unsloth switches and its MoE backend in this process; returns (backend requested, switches).
    unsloth_zoo reads them lazily at the first MoE call (the block-compile switches at the first layer call), so
    setting them after import is in time; each draw's env.json records them."""
    requested = plan.get("moe_backend") or "grouped_mm"
    switches = run_env(plan)
    os.environ.update(switches)
    os.environ["UNSLOTH_MOE_BACKEND"] = requested
    return requested, switches


def prewarm_moe_autotune(model) -> dict:
    """Tune Unsloth's Triton MoE kernels once, eagerly, before the first step.

    unsloth_zoo's forward_triton_grouped_gemm tunes at its first call; inside the compiled decoder layer that call
    is traced, Triton's Autotuner never sets best_config, and Unsloth logs "MoE kernel auto-tuning failed" and
    runs default configurations (Qwen3 on the H200). Tuning here fills the process-wide config cache that the
    traced call then reads, with the arguments that forward passes (its two GEMMs, the activations' bf16)."""
    import torch
    from unsloth.kernels.moe.autotune_cache import get_or_autotune_moe_kernels
    from unsloth_zoo.temporary_patches import moe_utils

    calls = moe_autotune_calls(model, torch.bfloat16, moe_utils._logical_expert_shape,
                               lambda m: _declared_input_major(moe_utils, m))
    if not calls:
        return {"calls": [], "skipped": "no fused experts with a usable logical shape"}
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


def _declared_input_major(moe_utils, module) -> bool | None:
    """The layout flags unsloth_zoo reads before it guesses from the shape (its _experts_are_input_major)."""
    if bool(moe_utils._module_flag(module, "_unsloth_grouped_mm_format", False)):
        return True
    declared = moe_utils._module_flag(module, "is_transposed", None)
    return declared if isinstance(declared, bool) else None


def moe_autotune_calls(model, dtype, logical_shape=lambda p: tuple(p.shape), declared=lambda m: None) -> list[dict]:
    """The two get_or_autotune_moe_kernels calls unsloth_zoo makes for the first fused-experts module (every
    layer of one model has the same shape): gate/up (K = hidden) and down (K = intermediate). The shape is the
    logical one: a 4-bit expert stack is stored packed (the Qwen3 4-bit arm: bitsandbytes (n, 1) data), and
    its stored shape would give a zero width (sitting 5's prewarm did: "cannot reshape tensor of 0 elements")."""
    experts = next((m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "num_experts")), None)
    if experts is None:
        return []
    hidden = int(model.config.hidden_size)
    shape = tuple(int(x) for x in logical_shape(experts.gate_up_proj))
    major = declared(experts)
    if major is None:
        major = shape[-1] != hidden
    inter = (shape[-1] if major else shape[1]) // 2 if len(shape) == 3 else 0
    if inter <= 0:
        return []
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
