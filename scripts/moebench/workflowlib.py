"""Helpers the Snakefile calls at parse time (kept here so they are unit-tested, not buried in rules). None of them
writes a file: parsing the workflow must leave the tree as it was."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

from .config import ConfigError, load_yaml
from .io import atomic_write


def put_package_on_pythonpath() -> str:
    """Jobs run `python -m moebench.<stage>`: make the package importable in every job, local or on a cluster,
    keeping whatever PYTHONPATH the user had (e.g. an offline wheel bundle)."""
    scripts = str(Path(__file__).resolve().parents[1])
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != scripts]
    os.environ["PYTHONPATH"] = os.pathsep.join([scripts, *parts])
    # and `python` in a job is the interpreter running Snakemake (`.venv/bin/snakemake` without activating the
    # venv would otherwise hand jobs the system python, which lacks torch: arms then read "not installed")
    here = os.path.dirname(sys.executable)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != here]
    os.environ["PATH"] = os.pathsep.join([here, *path])
    return scripts


def check_executor(workflow) -> None:
    """A Slurm run needs Slurm's commands here; the plugin would otherwise fail on a missing `sacct`."""
    plugin = workflow.executor_plugin
    if plugin is not None and plugin.name == "slurm" and shutil.which("sbatch") is None:
        raise RuntimeError("--profile slurm-gpu submits jobs with `sbatch`, which is not on PATH here. Run on the "
                           "cluster's login node (or load its Slurm module), or run locally: snakemake --cores 2")


def config_text(config: dict) -> str:
    """The run's validated config as the YAML its jobs read (sorted keys: the same config, the same bytes)."""
    return yaml.safe_dump(json.loads(json.dumps(config)), sort_keys=True)


def config_digest(config: dict) -> str:
    """sha256 of config_text: the param that reruns checkpoint run_config when the run's config changes."""
    return hashlib.sha256(config_text(config).encode()).hexdigest()


def write_effective_config(text: str, path: str, log: str | None = None) -> str:
    """Job body of checkpoint run_config: write the config text (never called at parse time, so parsing the
    workflow, `snakemake -n` included, writes nothing). Consumers take the file as an ancient() input: rewriting it
    reruns no job by itself; each rule's `settings` param decides which of its jobs the change concerns."""
    atomic_write(Path(path), text)
    if log:
        atomic_write(Path(log), f"{path} written, sha256 {hashlib.sha256(text.encode()).hexdigest()}\n")
    return path


def stale_config_input(runs: dict, ancient):
    """Input function of checkpoint run_config: config/config.yaml, ancient() (never a reason to rerun) while
    results/<run>/config.yaml is the text the run's config gives. Where it is not, that file is dated back to
    2 January 1970 (content untouched; its consumers read it as ancient() input, so the date alone reruns
    nothing) and the input is plain: newer, so Snakemake rewrites it. The input set stays the same either way."""
    def stale(wildcards):
        path = Path(f"results/{wildcards.run}/config.yaml")
        if path.is_file() and path.read_text() != config_text(runs[wildcards.run]):
            os.utime(path, (86400, 86400))  # not 0: Snakemake reads a zero time as "none"
            return "config/config.yaml"
        return ancient("config/config.yaml")
    return stale


def effective_config(config: dict) -> str:
    """Where the run's validated config lives, results/<run>/config.yaml (made by checkpoint run_config)."""
    return f"results/{config['run']}/config.yaml"


# ---- several tiers in one invocation (config `cluster.tiers`) -----------------------------------------------
# A tier's placement key -> the Slurm executor plugin's resource name.
CLUSTER_RESOURCES = {"partition": "slurm_partition", "account": "slurm_account", "gpu_model": "gpu_model",
                     "constraint": "constraint"}


def runs(config: dict) -> dict[str, dict]:
    """Run name -> that run's config. Without `cluster.tiers` one run, `config["run"]`, exactly as configured.
    With it, one run per tier (and per partition where a tier lists several): `<run>-<tier>` (or
    `<run>-<tier>-<partition>`), its tier forced, its `cluster.tiers` holding only its own placement (so adding a
    tier changes no other run's config). Raises ConfigError naming a tier that config/tiers.yaml lacks, or an
    optional key set on some tiers only (a resource one run sets and another does not would wipe the profile's
    default for the other: Snakemake drops a resource whose function returns None instead of using the default)."""
    tiers = (config.get("cluster") or {}).get("tiers") or {}
    if not tiers:
        return {config["run"]: config}
    known = load_yaml("tiers.yaml")
    for tier in tiers:
        if tier not in known:
            raise ConfigError(f"config key 'cluster.tiers.{tier}': {tier!r} is not a tier of config/tiers.yaml; "
                              f"allowed: {', '.join(sorted(known))}")
    for key in CLUSTER_RESOURCES:
        setting = sorted(t for t, spec in tiers.items() if key in spec)
        if setting and len(setting) < len(tiers):
            lacking = sorted(set(tiers) - set(setting))
            raise ConfigError(f"config key 'cluster.tiers.{lacking[0]}.{key}': missing, but tier(s) "
                              f"{', '.join(setting)} set {key!r}; set it on every tier in cluster.tiers or on none "
                              "(then the profile's default-resources applies to all)")
    out = {}
    for tier, spec in tiers.items():
        parts = spec["partition"]
        for part in [parts] if isinstance(parts, str) else parts:
            name = f"{config['run']}-{tier}" if isinstance(parts, str) else f"{config['run']}-{tier}-{part}"
            cfg = copy.deepcopy(config)
            cfg.update(run=name, tier=tier, cluster={"tiers": {tier: {**copy.deepcopy(spec), "partition": part}}})
            out[name] = cfg
    return out


def placement(config: dict) -> dict:
    """The Slurm resources of one run (from runs()): {} when it has no cluster placement."""
    tiers = (config.get("cluster") or {}).get("tiers") or {}
    spec = tiers.get(config["tier"], {})
    return {CLUSTER_RESOURCES[k]: v for k, v in spec.items() if k in CLUSTER_RESOURCES}


def per_run(config: dict, fn, *args):
    """A rule setting that depends on the run: `fn(run_config, *args)`. With one run the plain value (exactly as
    before the fan-out existed); with several a function of the job's {run} wildcard, which Snakemake calls per
    job (params and resources accept both)."""
    values = {name: fn(cfg, *args) for name, cfg in runs(config).items()}
    if len(values) == 1:
        return next(iter(values.values()))

    def of_run(wildcards):
        return values[wildcards.run]

    return of_run


def cluster_resources(config: dict) -> dict:
    """Resources for the rules that go to Slurm: each run's partition, account, gpu_model and constraint from
    `cluster.tiers`. Only keys some tier sets appear (runs() makes sure every tier then sets them): a key absent
    here keeps the profile's default-resources. Empty without `cluster.tiers`."""
    by_run = {name: placement(cfg) for name, cfg in runs(config).items()}
    keys = sorted({k for p in by_run.values() for k in p})
    return {k: per_run(config, lambda cfg, k=k: placement(cfg)[k]) for k in keys}


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


def sweeps(config: dict) -> list[tuple[str, str]]:
    """(arm, kind) of each capacity sweep config `sweeps` asks for: true = every arm, both kinds."""
    s = config.get("sweeps")
    if not s:
        return []
    other = [] if s is True else [a for a in s.get("arms") or [] if a not in config["arms"]]
    if other:
        raise ValueError(f"sweeps.arms names {other}, not in this run's arms {config['arms']}: add them to `arms` "
                         "or drop them from the sweep")
    arms = config["arms"] if s is True or not s.get("arms") else [a for a in config["arms"] if a in s["arms"]]
    kinds = ("seq", "batch") if s is True or not s.get("kinds") else s["kinds"]
    return [(a, k) for a in arms for k in kinds]


def recipe_points(config: dict) -> dict[str, list[str]]:
    """arm -> its `recipe.points` shapes ("BxS"), for arms the run has; a point naming another arm is an error."""
    out: dict[str, list[str]] = {}
    for spec in (config.get("recipe") or {}).get("points") or []:
        arm, shape = spec.split(":")
        if arm not in config["arms"]:
            raise ValueError(f"recipe.points: {spec!r} names arm {arm!r}, which is not in this run's arms "
                             f"{config['arms']}: add it to `arms` or drop the point")
        out.setdefault(arm, []).append(shape)
    return out


def point_targets(config: dict, results: str) -> list[str]:
    """One file per arm and draw (each draw measures all of that arm's points, one fresh process per point);
    draw 1 of every arm before draw 2, so a lease that ends early has spread its draws."""
    pts = recipe_points(config)
    n = (config.get("recipe") or {}).get("point_draws", 2)
    return [f"{results}/points/{arm}_d{k}.csv" for k in range(1, n + 1) for arm in pts]


def draw_targets(tier_json: str, results: str, arms: list[str]) -> list[str]:
    plan = json.loads(Path(tier_json).read_text())["plan"]
    # the verdict pair gets the plan's verdict_draws (>= 3 on GPU tiers), every other arm its draws
    n = {arm: max(plan["draws"], plan.get("verdict_draws", 0)) if arm in VERDICT_ARMS else plan["draws"] for arm in arms}
    return [f"{results}/arms/{arm}/draw{k}/metrics.csv" for arm in arms for k in range(1, n[arm] + 1)]


VERDICT_ARMS = ("unsloth_bf16", "unsloth_4bit")


# Which config keys each stage's results depend on. Rules pass `settings(config, stage)` as a param, so
# Snakemake reruns a job only when its own settings change (adding an arm reruns no other arm's draws).
STAGE_KEYS = {
    "detect": ["tier", "plan_overrides"],
    "model": ["model", "seed", "data"],
    "data": ["data"],
    "bench": ["model", "lora", "seed", "arm_timeout_s", "idle_baseline_s", "bare_loop_arms"],
    "offload": ["model", "lora", "seed", "offload", "arm_timeout_s"],
    "shape_curve": ["model", "lora", "seed", "arm_timeout_s", "shape_curve"],
    "routing_ab": ["model", "lora", "seed", "arm_timeout_s", "routing_ab"],
    "validate": ["model", "lora", "seed", "validate"],
    "aggregate": ["arms", "baselines", "verdict"],
    "stamp": ["provenance"],
}


def settings(config: dict, stage: str) -> str:
    keys = STAGE_KEYS.get(stage) or sorted(config)
    return json.dumps({k: config.get(k) for k in keys}, sort_keys=True)
