"""A small but complete results/<run> in a temp directory, laid out as the workflow writes it: per-draw metrics.csv,
run.log (with MOEBENCH_ROW lines written by metrics.log_row) and env.json, then aggregate.py's metrics.csv,
comparison.csv and verdict.json. The provenance, stamp and audit run on it as on a real run."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from moebench import aggregate  # noqa: E402
from moebench.io import write_json  # noqa: E402
from moebench.metrics import Row, log_row, write_rows  # noqa: E402

RUN = "fake-h100"
# arm -> (precision, step_s per draw); None: skipped on this tier
ARMS = {"hf_bf16": ("bf16", [0.90, 0.94]), "unsloth_bf16": ("bf16", [0.30, 0.32]),
        "unsloth_4bit": ("nf4", [0.61, 0.63]), "hf_bnb4": ("nf4", None)}


def _draw_rows(run_dir: Path, arm: str, precision: str, draw: int, step) -> tuple[list[Row], Path]:
    log_path = run_dir / "arms" / arm / f"draw{draw}" / "run.log"
    src = str(log_path.relative_to(run_dir.parent.parent))
    base = dict(run_id=RUN, tier="h100", model="gpt-oss-20b", arm=arm, precision=precision, source=src, draw=draw)
    if step is None:
        return [Row(**base, stage="bench", metric="step_s", unit="s", status="skipped",
                    reason=f"{arm} needs bitsandbytes (not installed)")], log_path
    return [Row(**base, stage="bench", metric="step_s", value=step, unit="s", n=6, spread=step / 50),
            Row(**base, stage="bench", metric="tokens_per_s", value=4096 / step, unit="tokens/s", n=6),
            Row(**base, stage="bench", metric="peak_alloc_gb", value=40.5 + draw / 10, unit="GB"),
            Row(**base, stage="bench", metric="expert_lora_params", value=655360.0, unit="params"),
            Row(**base, stage="bench", metric="load_s", value=12.25 + draw, unit="s"),
            Row(**base, stage="energy", metric="energy_j", unit="J", status="unavailable",
                reason="NVML energy counter not supported on this GPU")], log_path


def step_times(step: float, spread: float, n: int = 6) -> list[float]:
    """n = 6 step times, as bench prints them (4 decimals), whose median is `step` and whose inclusive
    interquartile range is `spread`: offsets -3b, -b, -b, b, b, 3b with b = spread / 2."""
    b = spread / 2
    assert n == 6
    return [round(step + k * b, 4) for k in (-3, -1, -1, 1, 1, 3)]


def _write_log(path: Path, rows: list[Row]) -> None:
    log = logging.getLogger(f"fakebench.{path}")
    log.setLevel(logging.INFO)
    log.propagate = False
    path.parent.mkdir(parents=True, exist_ok=True)
    h = logging.FileHandler(path, mode="w")
    h.setFormatter(logging.Formatter("%(asctime)s bench %(levelname)s %(message)s"))
    log.addHandler(h)
    log.info("loading model")
    step = next((r for r in rows if r.stage == "bench" and r.metric == "step_s" and r.status == "measured"), None)
    if step is not None:  # the per-step lines the audit recomputes the median and spread from
        times = step_times(step.value, step.spread, step.n)
        for i, t in enumerate(times, 1):
            log.info("timed step %d/%d: %.4f s", i, len(times), t)
        (path.parent / "steps.csv").write_text("step,seconds,tokens\n" + "".join(
            f"{i},{t!r},4096\n" for i, t in enumerate(times, 1)))
    for r in rows:
        log_row(log, r)
    log.info("done")
    h.close()
    log.removeHandler(h)


def make_run(root: Path, run: str = RUN) -> Path:
    """Write root/results/<run>/ and the config copy; returns the run directory."""
    import yaml

    assert run == RUN
    run_dir = root / "results" / run
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg.update(run=run, arms=list(ARMS), baselines=["hf_bf16", "unsloth_4bit"])
    cfg["validate"] = {**cfg.get("validate", {}), "arms": ["hf_bf16"]}  # one validation and one offload run:
    cfg["offload"] = {**cfg.get("offload", {}), "runs": ["hf_bf16:plain"]}  # every stage's log is audited
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True))
    write_json(run_dir / "tier.json", {
        "tier": "h100", "gpu": {"name": "NVIDIA H100 80GB HBM3", "driver": "570.86.15", "cuda": "12.8",
                                "memory_gb": 79.1}, "gpu_count": 1,
        "host": {"hostname": "node7", "cores": 16, "ram_gb": 128}, "plan": {"draws": 2, "seq_len": 1024}})
    for name, text in (("train.jsonl", '{"text": "a"}\n'), ("heldout.jsonl", '{"text": "b"}\n')):
        (run_dir / "data" / name).write_text(text)
    import hashlib

    (run_dir / "data" / "data.sha256").write_text("".join(
        f"{hashlib.sha256((run_dir / 'data' / n).read_bytes()).hexdigest()}  {n}\n"
        for n in ("heldout.jsonl", "train.jsonl")))
    write_json(run_dir / "model.sha256", {"config_sha256": "ab" * 32,
                                          "weights_sha256": {"model.safetensors": "cd" * 32},
                                          "model": {"name": "gpt-oss-20b", "source": "random-init"}})
    for arm, (precision, steps) in ARMS.items():
        for k in (1, 2):
            rows, log_path = _draw_rows(run_dir, arm, precision, k, steps[k - 1] if steps else None)
            _write_log(log_path, rows)
            write_rows(log_path.parent / "metrics.csv", rows)
            write_json(log_path.parent / "env.json", {
                "arm": arm, "draw": k, "started": f"2026-01-02T10:0{k}:00+00:00",
                "ended": f"2026-01-02T10:0{k}:30+00:00", "python": "3.11.7", "packages": {"torch": "2.9.0"}})
    _other_stages(run_dir)
    aggregate_run(root, run_dir)
    return run_dir


def aggregate_run(root: Path, run_dir: Path) -> None:
    """aggregate.py over every stage's metrics.csv, as rule aggregate runs it (again after a row changed). Every
    path is absolute, so it runs where it is (no chdir): the background tests call it from a thread."""
    inputs = [str(p) for pattern in ("arms/*/draw*/metrics.csv", "validate/*/metrics.csv", "offload/*/*/metrics.csv")
              for p in sorted(run_dir.glob(pattern))]
    aggregate.main(["--config", str(run_dir / "config.yaml"), "--inputs", *inputs,
                    "--metrics", str(run_dir / "metrics.csv"), "--comparison", str(run_dir / "comparison.csv"),
                    "--markdown", str(run_dir / "comparison.md"), "--verdict", str(run_dir / "verdict.json")])


def _other_stages(run_dir: Path) -> list[Path]:
    """validate/hf_bf16 and offload/hf_bf16/plain: their run.log and metrics.csv, as those stages write them."""
    out = []
    for stage, sub, metrics in (("validate", "validate/hf_bf16", (("loss_first", 11.5, "nats"),
                                                                 ("loss_last", 9.25, "nats"),
                                                                 ("expert_lora_grad_fraction", 1.0, "fraction"))),
                                ("offload", "offload/hf_bf16/plain", (("step_s", 1.5, "s"),
                                                                      ("tokens_per_s", 2730.5, "tokens/s")))):
        log_path = run_dir / sub / "run.log"
        src = str(log_path.relative_to(run_dir.parent.parent))
        rows = [Row(run_id=RUN, tier="h100", model="gpt-oss-20b", arm="hf_bf16", precision="bf16", stage=stage,
                    metric=m, value=v, unit=u, source=src) for m, v, u in metrics]
        _write_log(log_path, rows)
        write_rows(log_path.parent / "metrics.csv", rows)
        out.append(log_path.parent / "metrics.csv")
    return out


def env(root: Path) -> dict:
    """Environment for subprocesses: the package on the path, the venv's bin first, the ots cache in root."""
    return {**os.environ, "PYTHONPATH": str(SCRIPTS), "XDG_CACHE_HOME": str(root / ".cache"),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def provenance_args(run_dir: Path, history: str = "audits/.ots-history") -> list[str]:
    r = f"results/{run_dir.name}"
    return ["--run-dir", r, "--config", f"{r}/config.yaml", "--metrics", f"{r}/metrics.csv", "--tier",
            f"{r}/tier.json", "--data-sha", f"{r}/data/data.sha256", "--model-sha", f"{r}/model.sha256",
            "--comparison", f"{r}/comparison.csv", "--verdict", f"{r}/verdict.json", "--history", history,
            "--out-json", f"{r}/provenance.json", "--out-md", f"{r}/PROVENANCE.md"]


def moebench(root: Path, module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"moebench.{module}", *args], cwd=root, env=env(root),
                          capture_output=True, text=True, timeout=timeout)


def read(path: Path) -> dict:
    return json.loads(Path(path).read_text())


HARNESS = '''# Test harness: the main Snakefile defines RUN, R, CONFIG, then includes rules/provenance.smk.
import sys
from pathlib import Path

configfile: "config/test.yaml"
sys.path.insert(0, str(Path(workflow.basedir).parent / "scripts"))
from moebench import workflowlib as wl  # noqa: E402

RUN = config["run"]
R = f"results/{RUN}"
RUN_CONFIG = f"{R}/config.yaml"  # the main Snakefile's checkpoint run_config writes it; here the test does
CONFIG = lambda wildcards, input: input.run_config


include: "rules/provenance.smk"


rule all:
    input:
        f"{R}/PROVENANCE.md",
        f"{R}/provenance_stamp.json",
    default_target: True
'''


def snakemake_harness(root: Path, run: str = RUN) -> None:
    """workflow/rules/provenance.smk under a small Snakefile in root (HARNESS), for conftest.snakemake to run there
    with one core and env(root)."""
    import shutil

    (root / "workflow" / "rules").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "workflow" / "rules" / "provenance.smk", root / "workflow" / "rules")
    shutil.copy(ROOT / "environment.yml", root)
    (root / "workflow" / "Snakefile").write_text(HARNESS)
    (root / "results" / run / "claims.json").write_text('{"claims": []}\n')  # the claims rule is not here
    (root / "config").mkdir(exist_ok=True)
    (root / "config" / "test.yaml").write_text(f"run: {run}\n")
