"""Unsloth FP8 LoRA (`unsloth_fp8`): frozen weights in FP8 through torchao on Hopper, LoRA in bf16.

How Unsloth does it (read from unsloth 2026.10.7, models/loader.py and loader_utils.py): `load_in_fp8=True` on a
checkpoint its mapper does not know checks the host (`_get_fp8_mode_and_check_settings`: compute capability >= 9.0,
torch >= 2.9, torchao >= 0.15.0, not with 4/8/16-bit or full fine-tuning), then `_offline_quantize_to_fp8`
loads the model through transformers with `TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(PerRow()))`
(unsloth_zoo's `_get_torchao_fp8_config("row")`), saves it with `safe_serialization=False` to
`<tempdir>/<basename>-fp8-row` and loads that. Two reasons to prebuild instead: the quantization costs a load on
every fresh machine, and the cache is named by the directory's basename only, so every run's `model/` would share
`/tmp/model-fp8-row` and a stale one from another model would be loaded silently.

`make-fp8` below runs that same Unsloth function once per model build, into a private temp dir, and moves the
result to `<model>-fp8` with a record of what it did; the arm loads it with `use_exact_model_name=True` (no
re-quantization) and `load_in_fp8` still set, so Unsloth runs its own checks and FP8 tagging.

torchao quantizes `nn.Linear` weights only. GPT-OSS and Qwen3-MoE keep their experts as fused 3-D parameters in
transformers 5, so those may stay bf16 (as under bitsandbytes): the census says which weights really became FP8.
A torchao weight is a tensor subclass whose `dtype` reports the original bf16, so the census reads its inner
tensors (`__tensor_flatten__`) for the stored dtype and bytes.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from ..io import package_versions
from .base import Arm, ArmUnavailable, Loaded, LoRASpec
from .unsloth_runtime import apply_switches, preimport_unsloth, prewarm_if_triton

MIN_TORCHAO = "0.15.0"  # Unsloth's own floor for load_in_fp8 (pytorch/ao#3158)
MIN_CAPABILITY = (9, 0)  # Hopper: torch._scaled_mm's FP8 path
RECORD = "moebench_fp8.json"  # what make-fp8 did (or why it could not), beside the checkpoint
EXPERT_TARGETS = ("gate_proj", "up_proj", "down_proj")
FP8_DTYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")


# ---------------------------------------------------------------- census: which weights really are FP8
def _category(name: str) -> str:
    if "lora_" in name:
        return "lora"
    if "experts" in name.split("."):
        return "expert"
    if "self_attn" in name:
        return "attention"
    return "other"


def _inner(t) -> list:
    """The plain tensors a tensor subclass stores (torchao's Float8Tensor: qdata + scale), recursively."""
    if not hasattr(t, "__tensor_flatten__") or type(t).__name__ in ("Tensor", "Parameter"):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [x for n in names for x in _inner(getattr(t, n))]


def storage(t) -> tuple[str, int]:
    """(stored dtype, bytes) of a weight: a subclass is named by its largest inner tensor."""
    parts = _inner(t)
    big = max(parts, key=lambda x: x.numel())
    return str(big.dtype).replace("torch.", ""), sum(x.numel() * x.element_size() for x in parts)


def fp8_census(named) -> dict:
    """Bytes by category (expert/attention/other/lora) and stored dtype, from (name, tensor) pairs; the FP8
    fraction of each category's bytes; `experts_fp8` when the experts are mostly FP8."""
    by = defaultdict(lambda: defaultdict(lambda: {"tensors": 0, "numel": 0, "bytes": 0}))
    seen = set()
    for name, t in named:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        dt, nbytes = storage(t)
        cell = by[_category(name)][dt]
        cell["tensors"] += 1
        cell["numel"] += t.numel()
        cell["bytes"] += nbytes
    frac = {}
    for cat, cells in by.items():
        total = sum(c["bytes"] for c in cells.values())
        frac[cat] = sum(c["bytes"] for d, c in cells.items() if d in FP8_DTYPES) / total if total else 0.0
    return {"by_category": {c: dict(v) for c, v in by.items()}, "fp8_fraction": frac,
            "experts_fp8": frac.get("expert", 0.0) >= 0.5}


def census(model) -> dict:
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return fp8_census(named)


# ---------------------------------------------------------------- the prebuilt checkpoint
def fp8_dir_for(model_dir) -> str:
    return str(model_dir).rstrip("/") + "-fp8"


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def _older(a: str, b: str) -> bool:
    from packaging.version import Version

    return Version(a) < Version(b)


def host_reason(cuda: bool, capability: tuple[int, int] | None = None) -> str | None:
    """Why FP8 cannot run on this host (None: it can), from cheap checks: CUDA, torchao's version, Hopper."""
    if not cuda:
        return "unsloth_fp8 needs CUDA on a Hopper-class GPU (no GPU on this host)"
    ao = _version("torchao")
    if ao is None:
        return f"unsloth_fp8 needs the Python package 'torchao' >= {MIN_TORCHAO} (not installed)"
    if _older(ao, MIN_TORCHAO):
        return f"unsloth_fp8 needs torchao >= {MIN_TORCHAO} (Unsloth's load_in_fp8 floor); found {ao}"
    if capability is not None and tuple(capability) < MIN_CAPABILITY:
        return (f"unsloth_fp8 needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Hopper FP8); "
                f"this GPU is {capability[0]}.{capability[1]}")
    return None


def _record(path) -> dict | None:
    p = Path(path) / RECORD
    return json.loads(p.read_text()) if p.is_file() else None


def make_fp8_checkpoint(src: str, dst: str, mode: str = "row") -> dict:
    """Quantize `src` to FP8 once, as Unsloth's on-the-fly path would, and save it to `dst` with a record.
    Where it cannot run (no CUDA, no torchao, not Hopper) the record says why and nothing else is written."""
    cuda, cap = _cuda()
    why = host_reason(cuda, cap)
    record = {"src": str(src), "mode": mode, "versions": package_versions(("unsloth", "unsloth_zoo", "torchao",
                                                                            "transformers", "torch"))}
    Path(dst).mkdir(parents=True, exist_ok=True)
    if why:
        record["skipped"] = why
    else:
        try:
            record.update(_quantize(src, dst, mode))
        except Exception as exc:  # noqa: BLE001 - recorded: the arm's rows then say why, the workflow goes on
            import traceback

            traceback.print_exc()
            record["failed"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    (Path(dst) / RECORD).write_text(json.dumps(record, indent=1, default=str) + "\n")
    return record


def _cuda() -> tuple[bool, tuple[int, int] | None]:
    import torch

    if not torch.cuda.is_available():
        return False, None
    return True, tuple(torch.cuda.get_device_capability())


def _quantize(src: str, dst: str, mode: str) -> dict:
    """Unsloth's own `_offline_quantize_to_fp8`, pointed at a private temp dir (it caches under
    `<tempdir>/<basename>-fp8-<mode>`), its result moved to `dst`. Falls back to the same steps written out
    (Unsloth's torchao config, transformers' TorchAoConfig, save with safe_serialization=False) if that private
    function moved."""
    import shutil

    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import unsloth  # noqa: F401  (first: it patches transformers)

    try:
        from unsloth.models.loader_utils import _offline_quantize_to_fp8
    except ImportError as exc:
        return {"route": f"written out (unsloth's _offline_quantize_to_fp8 not importable: {exc})",
                **_quantize_written_out(src, dst, mode)}
    with tempfile.TemporaryDirectory(dir=Path(dst).parent) as tmp:
        old, tempfile.tempdir = tempfile.tempdir, tmp
        try:
            made = Path(_offline_quantize_to_fp8(str(Path(src).resolve()), mode))
        finally:
            tempfile.tempdir = old
        for f in made.iterdir():
            shutil.move(str(f), str(Path(dst) / f.name))
    files = {f.name: f.stat().st_size for f in sorted(Path(dst).iterdir()) if f.name != RECORD}
    src_bytes = sum(f.stat().st_size for f in Path(src).glob("*.safetensors"))
    return {"route": "unsloth.models.loader_utils._offline_quantize_to_fp8", "files": files,
            "bytes_on_disk": sum(files.values()), "source_weight_bytes": src_bytes}


def _quantize_written_out(src: str, dst: str, mode: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TorchAoConfig
    from unsloth_zoo.vllm_utils import _get_torchao_fp8_config  # the config Unsloth's load_in_fp8 uses

    qconfig = _get_torchao_fp8_config(mode)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, device_map="cuda",
                                                 quantization_config=TorchAoConfig(qconfig))
    out = {"torchao_config": repr(qconfig), "census": census(model)}
    model.save_pretrained(dst, safe_serialization=False)  # as Unsloth saves it (torchao subclasses)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return out


# ---------------------------------------------------------------- the arm
class UnslothFP8(Arm):
    name = "unsloth_fp8"
    stack = "unsloth"
    precision = "fp8"
    needs_cuda = True
    packages = ("unsloth", "unsloth_zoo", "peft", "torchao")

    def unavailable_reason(self, cuda: bool) -> str | None:
        return host_reason(cuda) or super().unavailable_reason(cuda)

    def checkpoint(self, model_dir: str, plan: dict) -> str:
        return plan.get("unsloth_fp8_dir") or fp8_dir_for(model_dir)

    def refusal(self, model_dir: str, plan: dict) -> str | None:
        source = self.checkpoint(model_dir, plan)
        rec = _record(source)
        if rec and (rec.get("skipped") or rec.get("failed")):
            return f"unsloth_fp8: the FP8 checkpoint {source} was not made: {rec.get('skipped') or rec['failed']}"
        if rec is None or not any(Path(source).glob("*.bin")) and not any(Path(source).glob("*.safetensors")):
            return (f"unsloth_fp8: no prebuilt FP8 checkpoint at {source} (Unsloth would otherwise quantize on every "
                    f"fresh machine into a cache named by basename only). Make it first: "
                    f"python -m moebench.arms.unsloth_fp8 make-fp8 {model_dir} {source}")
        return None

    def preimport(self) -> None:
        preimport_unsloth()

    def load(self, model_dir: str, lora: LoRASpec, plan: dict) -> Loaded:
        import torch

        why = host_reason(True, tuple(torch.cuda.get_device_capability())) or self.refusal(model_dir, plan)
        if why:
            raise ArmUnavailable(why)
        requested, switches = apply_switches(plan)
        from unsloth import FastLanguageModel

        source = self.checkpoint(model_dir, plan)
        mode = (_record(source) or {}).get("mode", "row")
        fp8 = True if mode == "row" else mode  # Unsloth's spelling: True = row-wise scales, "block" = 128x128
        model, _tok = FastLanguageModel.from_pretrained(
            model_name=source, max_seq_length=int(plan.get("seq_len", 2048)), dtype=torch.bfloat16,
            load_in_4bit=False, load_in_fp8=fp8, full_finetuning=False, local_files_only=True,
            use_exact_model_name=True)
        info = {"loader": f"FastLanguageModel.from_pretrained(load_in_fp8={fp8!r}, use_exact_model_name=True)",
                "checkpoint": source, "moe_backend_requested": requested, "unsloth_env": switches,
                "fp8_census_after_load": census(model)}
        info["moe_autotune_prewarm"] = prewarm_if_triton(model)
        gc = plan.get("gradient_checkpointing", "unsloth")
        targets = list(lora.attention) + (list(EXPERT_TARGETS) if lora.experts else [])
        model = FastLanguageModel.get_peft_model(
            model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, bias="none",
            use_gradient_checkpointing=(gc if gc else False), random_state=3407)
        info["target_modules"] = targets
        info["target_parameters"] = list(getattr(model.peft_config["default"], "target_parameters", None) or [])
        info["fp8_census_after_peft"] = census(model)
        from .. import inspect as insp  # shared: expert-LoRA coverage, trainable tensors

        info["expert_lora"] = insp.expert_lora_coverage(model, int(getattr(model.config, "num_hidden_layers", 0)))
        info["trainable"] = insp.trainable_summary(model)
        info["versions"] = package_versions(("unsloth", "unsloth_zoo", "torchao", "transformers", "peft", "torch"))
        frac = info["fp8_census_after_load"]["fp8_fraction"]
        if frac.get("expert", 0.0) < 0.5:
            info.setdefault("warnings", []).append(
                f"experts are NOT FP8 after load_in_fp8 (FP8 byte fraction {frac.get('expert', 0.0):.2f}): torchao "
                "quantizes nn.Linear only, the fused 3-D expert tensors stay bf16")
        return Loaded(model, info)


ARMS = (UnslothFP8,)


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description="Make the prebuilt FP8 (torchao) checkpoint Unsloth's load_in_fp8 loads.")
    ap.add_argument("cmd", choices=["make-fp8"])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--mode", choices=["row", "block"], default="row", help="Unsloth's row (default) or block scales")
    a = ap.parse_args(argv)
    print(json.dumps(make_fp8_checkpoint(a.src, a.dst, a.mode), indent=1, default=str))


if __name__ == "__main__":
    main()
