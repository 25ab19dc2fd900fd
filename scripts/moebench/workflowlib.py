"""Helpers the Snakefile calls at parse time (kept here so they are unit-tested, not buried in rules)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import yaml

from .io import atomic_write


def put_package_on_pythonpath() -> str:
    """Jobs run `python -m moebench.<stage>`: make the package importable in every job, local or on a cluster,
    keeping whatever PYTHONPATH the user had (e.g. an offline wheel bundle)."""
    scripts = str(Path(__file__).resolve().parents[1])
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != scripts]
    os.environ["PYTHONPATH"] = os.pathsep.join([scripts, *parts])
    return scripts


def check_executor(workflow) -> None:
    """A Slurm run needs Slurm's commands here; the plugin would otherwise fail on a missing `sacct`."""
    plugin = workflow.executor_plugin
    if plugin is not None and plugin.name == "slurm" and shutil.which("sbatch") is None:
        raise RuntimeError("--profile slurm-gpu submits jobs with `sbatch`, which is not on PATH here. Run on the "
                           "cluster's login node (or load its Slurm module), or run locally: snakemake --cores 2")


def write_effective_config(config: dict, path: str) -> str:
    """Write the validated config for the rules to read; leave the file alone when unchanged so a rerun with
    nothing changed does nothing (Snakemake compares modification times)."""
    text = yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=True)
    p = Path(path)
    if not p.exists() or p.read_text() != text:
        atomic_write(p, text)
    return path


def gpu_visible() -> bool:
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def gpu_jobs(config: dict) -> int:
    """GPU jobs ask for one GPU unless the run is the CPU tier (forced, or auto on a host without one)."""
    tier = config.get("tier", "auto")
    if tier == "cpu" or (tier == "auto" and not gpu_visible()):
        return 0
    return 1


def mem_mb(config: dict, stage: str) -> int:
    """Host memory a job asks for: a full-size GPT-OSS-20B checkpoint is ~42 GB of bf16 on the host while it
    loads; the CPU tier's tiny model needs little."""
    if gpu_jobs(config) == 0:
        return 4000
    return 96000 if stage in ("model", "bench") else 8000


def validate_arms(config: dict) -> list[str]:
    """Arms that get a training validation: `validate.arms` (a subset of `arms`), all arms when unset."""
    chosen = (config.get("validate") or {}).get("arms")
    return list(config["arms"]) if chosen is None else [a for a in config["arms"] if a in chosen]


def draw_targets(tier_json: str, results: str, arms: list[str]) -> list[str]:
    plan = json.loads(Path(tier_json).read_text())["plan"]
    return [f"{results}/arms/{arm}/draw{k}/metrics.csv" for arm in arms for k in range(1, plan["draws"] + 1)]


# Which config keys each stage's results depend on. Rules pass `settings(config, stage)` as a param, so
# Snakemake reruns a job only when its own settings change (adding an arm reruns no other arm's draws).
STAGE_KEYS = {
    "detect": ["tier", "plan_overrides"],
    "model": ["model", "seed", "data"],
    "data": ["data"],
    "bench": ["model", "lora", "seed", "arm_timeout_s", "idle_baseline_s", "bare_loop_arms"],
    "offload": ["model", "lora", "seed", "offload", "arm_timeout_s"],
    "validate": ["model", "lora", "seed", "validate"],
    "aggregate": ["arms", "baselines", "verdict"],
    "stamp": ["provenance"],
}


def settings(config: dict, stage: str) -> str:
    keys = STAGE_KEYS.get(stage) or sorted(config)
    return json.dumps({k: config.get(k) for k in keys}, sort_keys=True)
