"""Shared fixtures: the repository copied to a temp dir and the CPU workflow run there once per session."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
BIN = Path(sys.executable).parent
# Small but real: the default CPU plan with fewer timed steps, so the suite stays fast on 2 cores.
QUICK = ["--config", "plan_overrides={timed_steps: 3, warmup_steps: 1, draws: 2}"]


def copy_repo(dest: Path) -> Path:
    """What a fresh clone would hold: tracked files and untracked ones git does not ignore."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file() and not f.startswith("results/local"):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


def tiny_workdir(d: Path, model: str = "gpt-oss-20b", conversations: int = 30, **plan) -> dict:
    """A tiny random-init `model`, its data and a CPU tier.json (plan overridden by `plan`) in `d`, as the
    workflow lays them out: what the harness and validation tests train on. Returns the tier document."""
    from moebench import config as cfgmod
    from moebench import data, models
    from moebench.io import logger, write_json

    spec = cfgmod.load_yaml("models.yaml")[model]
    models.build(spec, "tiny", "random-init", str(d / "model"), 42, data.corpus_text(60, 42), logger("t"))
    data.build(str(d / "model"), conversations, 42, 0.1, str(d / "data"), logger("t"))
    tier = {"tier": "cpu", "gpu": None, "plan": {**cfgmod.load_yaml("tiers.yaml")["cpu"]["plan"], **plan}}
    write_json(d / "tier.json", tier)
    return tier


def snakemake(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run([str(BIN / "snakemake"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="session")
def cpu_run(tmp_path_factory) -> Path:
    """The CPU-tier workflow run once from a copy of the repo; returns that copy's root."""
    root = copy_repo(tmp_path_factory.mktemp("repo"))
    r = snakemake(root, "--cores", "2", *QUICK)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root
