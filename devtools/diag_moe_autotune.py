"""Does Unsloth's MoE kernel autotune fail only when Triton serves the result from its disk cache?

The H200 Qwen3 run's unsloth_4bit draw printed "MoE kernel auto-tuning failed: 'Autotuner' object has no attribute
'best_config'" and fell back to default kernel configs (a degraded row). The lent-GPU queue exported
TRITON_CACHE_AUTOTUNING=1. This runs Unsloth's own autotune at Qwen3-30B-A3B's expert shape in one process and
prints what happened, so three processes in a row (cache off; on, cold; on, warm) tell which path fails:

    TRITON_CACHE_DIR=/tmp/tc python devtools/diag_moe_autotune.py            # 1: no autotune cache
    TRITON_CACHE_DIR=/tmp/tc TRITON_CACHE_AUTOTUNING=1 python devtools/...   # 2: writes it
    TRITON_CACHE_DIR=/tmp/tc TRITON_CACHE_AUTOTUNING=1 python devtools/...   # 3: reads it
"""
import inspect
import os
import time
import traceback

import unsloth  # noqa: F401  (sets up its kernels' import paths)
import torch
import triton
import triton.runtime.autotuner as at

src = inspect.getsource(at.Autotuner)
print(f"triton {triton.__version__}; TRITON_CACHE_AUTOTUNING={os.environ.get('TRITON_CACHE_AUTOTUNING')!r}; "
      f"'self.best_config =' appears {src.count('self.best_config =')}x in Autotuner", flush=True)
from unsloth.kernels.moe import autotune_cache as ac  # noqa: E402

t = time.time()
try:
    cfg = ac._run_moe_autotuning(128, 2048, 768, 8, torch.bfloat16, 4096)  # Qwen3-30B-A3B experts
    print(f"AUTOTUNE OK in {time.time() - t:.1f} s: {cfg}", flush=True)
except Exception:  # noqa: BLE001 - the failure is what this prints
    print(f"AUTOTUNE FAILED after {time.time() - t:.1f} s:", flush=True)
    traceback.print_exc()
