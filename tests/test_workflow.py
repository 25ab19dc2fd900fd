"""The whole chain on CPU from a copy of the repo, as a new user would run it."""
import os
import signal
import subprocess
import time

from conftest import BIN, QUICK, copy_repo, snakemake
from moebench.metrics import read_rows


def test_cpu_chain_leaves_every_output(cpu_run):
    r = cpu_run / "results" / "local"
    for f in ("tier.json", "data/train.jsonl", "data/heldout.jsonl", "data/data.sha256", "model.sha256",
              "metrics.csv", "comparison.csv", "comparison.md", "verdict.json"):
        assert (r / f).is_file(), f
    rows = read_rows(r / "metrics.csv")
    hf = [x for x in rows if x.arm == "hf_bf16" and x.metric == "step_s"]
    assert len(hf) == 2 and all(x.status == "measured" and x.value > 0 for x in hf)
    skipped = {x.arm for x in rows if x.status == "skipped"}
    assert {"hf_bnb4", "unsloth_bf16", "unsloth_4bit", "e4b_4bit"} <= skipped
    assert "| hf_bf16 | measured | 2 |" in (r / "comparison.md").read_text()


def test_second_invocation_does_nothing(cpu_run):
    r = snakemake(cpu_run, "--cores", "2", *QUICK, "-n")
    assert r.returncode == 0
    assert "Nothing to be done" in r.stdout + r.stderr, r.stdout[-2000:]


def test_lint_is_clean(cpu_run):
    r = snakemake(cpu_run, "--lint")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Congratulations" in r.stdout + r.stderr or "no issues" in (r.stdout + r.stderr).lower()


def test_killed_run_resumes_without_taking_partial_output(tmp_path):
    root = copy_repo(tmp_path)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    p = subprocess.Popen([str(BIN / "snakemake"), "--cores", "1", *QUICK], cwd=root, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    draw = root / "results" / "local" / "arms" / "hf_bf16"
    deadline = time.time() + 300
    while time.time() < deadline and not (draw / "draw1" / "run.log").exists():
        time.sleep(0.2)
    time.sleep(1.0)  # inside the first benchmark draw
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    assert not (root / "results" / "local" / "metrics.csv").exists()
    assert not (draw / "draw1" / "metrics.csv").exists()  # the killed draw left no output that looks done
    # after a hard kill (power loss) Snakemake's lock stays: --unlock as its message says, then run again
    assert snakemake(root, "--unlock").returncode == 0
    r = snakemake(root, "--cores", "2", *QUICK)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = read_rows(root / "results" / "local" / "metrics.csv")
    assert sum(x.metric == "step_s" and x.arm == "hf_bf16" and x.status == "measured" for x in rows) == 2
