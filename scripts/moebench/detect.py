"""GPU-tier detection: inventory the GPU(s) and host, pick a tier profile, write tier.json.

The tier decides model scale, sequence length, batch, MoE backend and step counts (config/tiers.yaml).
"""
from __future__ import annotations

import argparse
import os
import platform
import warnings

from . import config as cfgmod
from .io import logger, write_json

GIB = 2**30


def host_inventory() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu_model": cpu, "cores": os.cpu_count(), "ram_gb": round(mem / GIB, 1),
            "hostname": platform.node(), "python": platform.python_version(), "os": platform.platform()}


def _nvml_inventory() -> dict:
    try:
        import pynvml

        pynvml.nvmlInit()
        drv = pynvml.nvmlSystemGetDriverVersion()
        return {"driver": drv.decode() if isinstance(drv, bytes) else drv}
    except Exception as exc:  # no NVML on CPU hosts
        return {"driver": None, "nvml_error": str(exc)[:200]}


def gpu_inventory() -> list[dict]:
    """One dict per visible CUDA device (empty on a CPU host)."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    extra = _nvml_inventory()
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "memory_gb": round(p.total_memory / GIB, 1),
                     "compute_capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                     "cuda": torch.version.cuda, "torch": torch.__version__, **extra})
    return gpus


def _matches(match: dict, gpu: dict | None) -> bool:
    if gpu is None:
        return match.get("gpu") is False
    if match.get("gpu") is False:
        return False
    names = match.get("name")
    if names and not any(n.lower() in gpu["name"].lower() for n in names):
        return False
    lo, hi = match.get("memory_gb", [0, float("inf")])
    return lo <= gpu["memory_gb"] < hi


class TierMismatch(RuntimeError):
    """A forced tier that does not describe the node's GPU: every number would carry the wrong tier."""


def _describe(gpu: dict | None) -> str:
    return f"GPU {gpu['name']!r} ({gpu['memory_gb']} GB)" if gpu else "no GPU"


def pick_tier(gpus: list[dict], tiers: dict, forced: str = "auto") -> tuple[str, list[str]]:
    """Choose a tier for the first GPU (or cpu). Returns (tier, warnings).

    A forced tier (config `tier`, or each run of config `cluster.tiers`) must fit the GPU found here by the
    tier's own `match` in config/tiers.yaml: forcing h100_80gb on a node that has an A100, or a GPU tier on a
    node with no GPU, raises TierMismatch (the job landed on the wrong partition). Forcing `cpu` on a CPU node,
    or a generic tier on a card in its memory range, is fine."""
    gpu = gpus[0] if gpus else None
    if forced != "auto":
        if forced not in tiers:
            raise cfgmod.ConfigError(f"config key 'tier': got {forced!r}; allowed: auto or one of {sorted(tiers)}")
        if not _matches(tiers[forced]["match"], gpu):
            raise TierMismatch(f"tier {forced!r} is forced, but this node has {_describe(gpu)}, which that tier's "
                               f"match in config/tiers.yaml ({tiers[forced]['match']}) does not fit")
        return forced, [f"tier forced by config: {forced}"]
    named = [t for t, spec in tiers.items() if "name" in spec["match"] or "gpu" in spec["match"]]
    for t in named:
        if _matches(tiers[t]["match"], gpu):
            return t, []
    for t, spec in tiers.items():  # generic tiers: memory alone
        if t not in named and _matches(spec["match"], gpu):
            msg = (f"unknown GPU {gpu['name']!r} ({gpu['memory_gb']} GB): using generic tier {t!r} by memory; "
                   "add a profile to config/tiers.yaml for better defaults")
            return t, [msg]
    raise cfgmod.ConfigError(f"no tier in config/tiers.yaml matches GPU {gpu}")


def make_plan(tier: str, tiers: dict, overrides: dict) -> dict:
    plan = dict(tiers[tier]["plan"])
    plan.update(overrides or {})
    return plan


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--log")
    a = ap.parse_args(argv)
    log = logger("detect", a.log)
    cfg = cfgmod.load(a.config)
    tiers = cfgmod.load_yaml("tiers.yaml")
    gpus, host = gpu_inventory(), host_inventory()
    try:
        tier, notes = pick_tier(gpus, tiers, cfg["tier"])
    except TierMismatch as err:  # say where the job ran, and write no tier.json: nothing may be measured here
        where = ", ".join(f"{k}={os.environ[k]}" for k in ("SLURM_JOB_PARTITION", "SLURM_JOB_ID") if os.environ.get(k))
        msg = (f"detect: {err} (run {cfg['run']!r}, host {host['hostname']}{', ' + where if where else ''}). "
               "Map the tier to a partition that has its GPU (config cluster.tiers), or set tier: auto.")
        log.error(msg)
        raise SystemExit(msg) from None
    for n in notes:
        warnings.warn(n)
        log.warning(n)
    plan = make_plan(tier, tiers, cfg.get("plan_overrides"))
    doc = {"tier": tier, "gpu": gpus[0] if gpus else None, "gpus": gpus, "gpu_count": len(gpus),
           "host": host, "plan": plan, "notes": notes}
    write_json(a.out, doc)
    log.info("tier %s on %s; plan %s", tier, gpus[0]["name"] if gpus else "CPU", plan)


if __name__ == "__main__":
    main()
