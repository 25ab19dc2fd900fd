"""`snakemake --profile slurm-gpu` against a real Slurm: tests/slurm/start.sh brings up a single-node cluster
(Debian's Slurm 22.05, no accounting storage, CPU partitions `cpu` and `cpu2` standing in for GPU ones).

Checks: the jobs went through sbatch (Slurm's own controller log and the per-job Slurm logs), the results have a
local run's shape (same files, same model/data hashes, same metric rows), failures name the job's log, and the
profile does not hang where `sacct` has nothing to say (the plugin's default does: shown, bounded by SIGKILL).
The fan-out (config `cluster.tiers`): one run per partition, each job on its run's partition by Slurm's own
records, both runs of the same shape and side by side in the report; a tier mapped to a partition without its
GPU stops at detect with a plain message.
Skips only when Slurm cannot be had here (not root, or apt cannot install it). Every step is bounded.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

from conftest import (BACKGROUND_NICE, BIN, QUICK, ROOT, at_session_end, copy_repo, descendants, in_background,
                      renice_session, snakemake, venv_env)
from moebench.metrics import read_rows

SLURM = ROOT / "tests" / "slurm"
STATE = Path(os.environ.get("MOEBENCH_SLURM_DIR", "/tmp/moebench-slurm"))
PROFILES = ["--profile", "slurm-gpu", "--profile", "tests/slurm/profile"]  # literal, from the repo root
ABS_PROFILES = ["--profile", str(ROOT / "slurm-gpu"), "--profile", str(SLURM / "profile")]
# The plugin's own line per submission: "Job 3 has been submitted with SLURM jobid 12 (log: /…/12.log)."
SUBMITTED = re.compile(r"Job \d+ has been submitted with SLURM jobid (\d+) \(log: (\S+)\)\.")
CLUSTER_RULES = {"detect", "model", "bench", "offload", "validate", "sweep"}  # need the GPU node; every other rule is a localrule
# The cluster runs are slim (one arm, one draw, no offload, the small data of conftest.QUICK): each job costs a
# submission, a Snakemake start and the plugin's polling, whatever it computes. What they check stays whole: the
# plain run is compared with the same arm and draw of the session's local CPU run (conftest.cpu_run).
ARMS = ["hf_bf16"]
DRAWS = 1
SLIM = [*QUICK, f"plan_overrides={{timed_steps: 3, warmup_steps: 1, draws: {DRAWS}, seq_len: 64}}",
        "offload={runs: []}"]
# Every Snakemake of this module is started at once, at the end of collection (conftest.in_background), so they
# run beside the other modules' tests; each is bounded by these limits (a hang, not a slow machine, is what they
# catch); they share the cluster's queueing and polling waits instead of adding them.
LIMIT_S = {"plain": 540, "fanout": 540, "wrong": 240, "toy": 240, "sacct": 60}


def bounded(args: list[str], cwd: Path, env: dict, limit: float, nice: int = 0) -> tuple[int | None, str]:
    """conftest.snakemake with these args: (exit code, or None when killed at `limit`; all its output)."""
    r = snakemake(cwd, *args, timeout=limit, env=env, nice=nice)
    return r.returncode, r.out


def ctld_log() -> str:
    return (STATE / "log" / "slurmctld.log").read_text(errors="replace")


def partition_of(ctld: str, jobid: int) -> str | None:
    """The partition Slurm started the job in, by its controller's log: the main scheduler's "sched: Allocate" line
    or the backfill scheduler's "_start_job: Started" line (which one starts a job depends on timing)."""
    m = re.search(rf"sched: Allocate JobId={jobid} NodeList=\S+ #CPUs=\d+ Partition=(\S+)", ctld) or \
        re.search(rf"sched/backfill: _start_job: Started JobId={jobid} in (\S+) on ", ctld)
    return m.group(1) if m else None


def submissions(out: str) -> dict[str, list[tuple[int, Path]]]:
    """Rule -> [(Slurm job id, Slurm log)] as the plugin reported them (the log dir is rule_<name>/...)."""
    by_rule: dict[str, list[tuple[int, Path]]] = {}
    for jobid, log in SUBMITTED.findall(out):
        rule = next(p for p in Path(log).parts if p.startswith("rule_"))[len("rule_"):]
        by_rule.setdefault(rule, []).append((int(jobid), Path(log)))
    return by_rule


_UP: dict = {}  # the test cluster, brought up once: "outcome" ("ok", env) | ("skip" | "fail", why), "stopped"
_UP_LOCK = threading.Lock()


def _start_cluster() -> tuple[str, object]:
    if os.geteuid() != 0:
        return "skip", "needs root: installs Slurm with apt and starts munged/slurmctld/slurmd"
    try:
        # niced: the daemons, hence every job they start, are background work (conftest.BACKGROUND_NICE)
        r = subprocess.run(["nice", "-n", str(BACKGROUND_NICE), str(SLURM / "start.sh")], capture_output=True,
                           text=True, timeout=240)
    except subprocess.TimeoutExpired:
        return "fail", "tests/slurm/start.sh took over 240 s"
    if r.returncode == 77:
        return "skip", f"no Slurm here: {r.stderr.strip()[-500:]}"
    if r.returncode != 0:
        return "fail", f"start.sh failed:\n{r.stderr[-3000:]}"
    conf = re.search(r"export SLURM_CONF=(\S+)", r.stdout).group(1)
    env = venv_env(SLURM_CONF=conf)
    env.pop("SLURM_JOB_ID", None)  # pytest itself inside a Slurm job must not confuse the plugin
    return "ok", env


def bring_up() -> tuple[str, object]:
    """tests/slurm/start.sh, once: the background start and the fixture share its outcome."""
    with _UP_LOCK:
        if "outcome" not in _UP:
            _UP["outcome"] = _start_cluster()
            if _UP["outcome"][0] == "ok":
                at_session_end(stop_cluster)  # also when the session stops before this module
    return _UP["outcome"]


def stop_cluster(wait: bool = True) -> None:
    """tests/slurm/stop.sh, once. wait=False (the module's end) lets the daemons wind down (~6 s) beside the next
    tests; the session's end waits for it."""
    with _UP_LOCK:
        if _UP.get("outcome", ("",))[0] == "ok" and "stop" not in _UP:
            _UP["stop"] = subprocess.Popen([str(SLURM / "stop.sh")], stdout=subprocess.DEVNULL)
        if wait and "stop" in _UP:
            _UP["stop"].wait(timeout=60)


@pytest.fixture(scope="module")
def slurm_env():
    how, what = bring_up()
    if how == "skip":
        pytest.skip(what)
    if how == "fail":
        pytest.fail(what)
    yield what
    stop_cluster(wait=False)


_BG: dict = {}  # the background thread that brings the cluster up and runs every workflow; its "runs" or "error"


@in_background("cluster_runs")
def start_cluster_runs(tmp_path_factory) -> None:
    """Bring the cluster up and start every workflow `cluster_runs` returns, in a thread of its own."""
    if "thread" in _BG:
        return

    def work():
        try:
            how, env = bring_up()
            if how == "ok":
                _BG["runs"] = run_all(env, tmp_path_factory)
        except BaseException as e:  # handed to the fixture
            _BG["error"] = e

    _BG["thread"] = threading.Thread(target=work, name="slurm-workflows", daemon=True)
    _BG["thread"].start()


def run_all(env: dict, tmp_path_factory):
    """Every Snakemake the cluster tests inspect, started at once, each in its own directory (the workflows from
    fresh copies of the repo, as cluster users run them): `plain` the CPU-tier workflow through the profile;
    `fanout` the tier fan-out (FAN below); `wrong` a GPU tier mapped to a CPU partition, up to its detect; `toy`
    and `sacct` small Snakefiles (TOY, SACCT). Returns ({name: (dir, exit code or None, output, seconds)}, the
    controller's log lines written meanwhile, Slurm's view of the `sacct` run's job right after it was killed)."""
    plain, fan, wrong = (copy_repo(tmp_path_factory.mktemp(n), committed=()) for n in
                         ("slurm-repo", "slurm-fanout", "slurm-wrong-partition"))  # committed runs: see copy_repo
    toy, sacct = tmp_path_factory.mktemp("slurm-toy"), tmp_path_factory.mktemp("slurm-sacct")
    (toy / "Snakefile").write_text(TOY)
    (sacct / "Snakefile").write_text(SACCT)
    cmds = {"plain": ([*PROFILES, *SLIM, f"arms=[{', '.join(ARMS)}]"], plain),  # SLIM ends in --config
            "fanout": ([*PROFILES, *FAN_TARGETS, *SLIM, *FAN_CONFIG], fan),
            "wrong": ([*PROFILES, WRONG_TARGET, *SLIM, "cluster={tiers: {h100_80gb: {partition: cpu2}}}"], wrong),
            "toy": (ABS_PROFILES, toy),
            "sacct": ([*ABS_PROFILES, "--slurm-status-command", "sacct"], sacct)}
    mark = len(ctld_log())
    state = {}

    def one(name, args, root):
        t0 = time.time()
        rc, out = bounded(args, root, env, LIMIT_S[name], nice=BACKGROUND_NICE)
        if name == "sacct" and (m := SUBMITTED.search(out)):  # asked at once: Slurm forgets it after MinJobAge
            state["sacct"] = subprocess.run(["scontrol", "show", "job", m.group(1)], capture_output=True,
                                            text=True, env=env, timeout=30).stdout
        return root, rc, out, time.time() - t0

    done = threading.Event()
    threading.Thread(target=renice_jobs, args=(done,), daemon=True).start()
    try:
        with ThreadPoolExecutor(len(cmds)) as pool:
            futures = {k: pool.submit(one, k, *v) for k, v in cmds.items()}
            runs = {k: f.result() for k, f in futures.items()}
    finally:
        done.set()
    return runs, ctld_log()[mark:], state


def renice_jobs(done: threading.Event) -> None:
    """Every job slurmd starts is a session of its own: renice each (conftest.renice_session) as it appears, so
    the cluster's jobs stay background work."""
    pid = int((STATE / "run" / "slurmd.pid").read_text())
    seen: set[int] = set()
    while not done.wait(1.0):
        for child in set(descendants(pid)) - seen:
            renice_session(child, BACKGROUND_NICE)
            seen.add(child)


@pytest.fixture(scope="module")
def cluster_runs(slurm_env, tmp_path_factory):
    """run_all's answer: started at collection when this module's tests were selected, else now."""
    start_cluster_runs(tmp_path_factory)
    _BG["thread"].join()
    if "error" in _BG:
        raise _BG["error"]
    return _BG["runs"]


@pytest.fixture(scope="module")
def slurm_run(cluster_runs):
    (root, rc, out, took), ctld = cluster_runs[0]["plain"], cluster_runs[1]
    return root, rc, out, ctld, took


def test_profile_is_found_from_repo_root_and_avoids_the_sacct_hang():
    from snakemake.cli import get_profile_dir

    cwd = os.getcwd()
    try:  # snakemake resolves a bare profile name against the working directory first
        os.chdir(ROOT)
        assert get_profile_dir("slurm-gpu")[1].resolve() == ROOT / "slurm-gpu" / "config.yaml"
    finally:
        os.chdir(cwd)
    prof = yaml.safe_load((ROOT / "slurm-gpu" / "config.yaml").read_text())
    assert prof["executor"] == "slurm"
    assert prof["slurm-status-command"] == "squeue"
    assert {r for r, res in prof["set-resources"].items() if res.get("gpu") == 1} == CLUSTER_RULES
    # The workflow profile (workflow/profiles/default, loaded by every run) overrides this one key by key and
    # wipes its default-resources: it must hold nothing that would redirect or re-size cluster jobs.
    for wp in (ROOT / "workflow" / "profiles" / "default", ROOT / "profiles" / "default"):
        for f in wp.glob("*.yaml"):
            keys = set(yaml.safe_load(f.read_text()) or {})
            clash = {k for k in keys if k in ("executor", "default-resources", "set-resources", "jobs")
                     or k.startswith("slurm")}
            assert not clash, f"{f} sets {sorted(clash)}"


def test_profile_names_only_rules_the_workflow_has():
    """set-resources for a renamed rule is silently ignored: its jobs would then ask for no GPU."""
    r = snakemake(ROOT, "--list-rules", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    rules = set(r.stdout.split())
    for prof in (ROOT / "slurm-gpu" / "config.yaml", SLURM / "profile" / "config.yaml"):
        assert set(yaml.safe_load(prof.read_text())["set-resources"]) <= rules, prof
    assert CLUSTER_RULES <= rules


def test_workflow_runs_through_sbatch(slurm_run):
    root, rc, out, ctld, took = slurm_run
    assert rc is not None, f"killed after {took:.0f} s: the run hung\n{out[-4000:]}"
    assert rc == 0, out[-6000:]
    subs = submissions(out)
    assert {"detect", "model", "bench"} <= set(subs), f"submitted rules: {sorted(subs)}"
    assert set(subs) <= CLUSTER_RULES, f"light rules went to Slurm: {sorted(set(subs) - CLUSTER_RULES)}"
    # Slurm's own records of every job the plugin says it submitted: accepted, placed, exited 0.
    for rule, jobs in subs.items():
        for jobid, log in jobs:
            assert f"_slurm_rpc_submit_batch_job: JobId={jobid} " in ctld, (rule, jobid)
            assert partition_of(ctld, jobid) == "cpu", (rule, jobid)
            assert f"_job_complete: JobId={jobid} WEXITSTATUS 0" in ctld, (rule, jobid)
            text = log.read_text()  # the profile keeps successful jobs' logs
            assert re.search(rf"^(rule|checkpoint) {rule}:$", text, re.M) and "--mode remote" in text, log
    n_bench = len(list((root / "results" / "local" / "arms").glob("*/draw*/metrics.csv")))
    assert len(subs["bench"]) == n_bench > 0
    # A measured number records the Slurm job it came from.
    for jobid, log in subs["bench"]:
        arm, draw = re.fullmatch(r"local_(.+)_(\d+)", log.parent.name).groups()  # wildcards run_arm_draw
        env = yaml.safe_load((root / "results" / "local" / "arms" / arm / f"draw{draw}" / "env.json").read_text())
        assert str(env["env"].get("SLURM_JOB_ID")) == str(jobid), (arm, draw, env["env"])


def test_slurm_results_have_the_local_runs_shape(slurm_run, cpu_run):
    root, rc, out, _, _ = slurm_run
    assert rc == 0, out[-3000:]
    local, slurm = cpu_run / "results" / "local", root / "results" / "local"

    def ran_here(f: str) -> bool:  # the local run's other arms and draws and its offload runs left out
        m = re.match(r"(arms|sweep|offload|validate)/([^/]+)/([^/]+)", f)
        if not m:
            return True
        stage, arm, sub = m.groups()
        return stage != "offload" and arm in ARMS and (stage != "arms" or int(sub[len("draw"):]) <= DRAWS)

    def files(d: Path) -> set[str]:
        return {f for f in (str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()) if ran_here(f)}

    assert files(slurm) == files(local)
    for f in ("model.sha256", "data/data.sha256"):  # same seed, same bytes, wherever it ran
        assert (slurm / f).read_text() == (local / f).read_text(), f

    def shape(d: Path) -> set[tuple]:
        return {(x.arm, x.metric, x.status, x.unit, x.draw) for x in read_rows(d / "metrics.csv")
                if x.arm in ARMS and x.stage != "offload" and (x.draw is None or x.draw <= DRAWS)}

    assert shape(slurm) == shape(local)
    assert any(x.status == "measured" and x.value > 0 for x in read_rows(slurm / "metrics.csv"))


TOY = """
rule all:
    input: "ok.txt", "fails.txt", "nopart.txt", "gpu.txt"
rule ok:
    output: "ok.txt"
    shell: "echo $SLURM_JOB_ID > {output}"
rule fails:
    output: "fails.txt"
    shell: "echo 'moebench-test: deliberate failure' >&2; exit 3"
rule nopart:
    output: "nopart.txt"
    resources: slurm_partition="no_such_partition"
    shell: "touch {output}"
rule gpu:
    output: "gpu.txt"
    resources: gpu=1
    shell: "touch {output}"
"""


def test_failures_name_the_cause_and_the_log(cluster_runs):
    tmp_path, rc, out, _ = cluster_runs[0]["toy"]
    assert rc not in (None, 0), out[-4000:]
    assert (tmp_path / "ok.txt").is_file()  # keep-going: the other jobs still ran
    # a failed job: Slurm's state and the path of its log, which holds the job's own error
    block = out[out.index("Error in rule fails:"):]
    assert "SLURM status is: 'FAILED'" in block[:600]
    log = Path(re.search(r"log: (\S+\.log)", block).group(1))
    assert "deliberate failure" in log.read_text()
    # an unknown partition and a GPU request the cluster cannot serve: sbatch's own words and the call
    assert "Invalid partition name specified" in out and "-p no_such_partition" in out
    assert "Requested node configuration is not available" in out and "--gpus=1" in out


def test_missing_sbatch_says_so(tmp_path):
    """Submitting from a host without Slurm's commands: a plain message, not a traceback about `sacct`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    slurm_cmds = {"sbatch", "squeue", "sinfo", "sacct", "sacctmgr", "scontrol", "srun", "scancel", "sshare"}
    for d in os.environ["PATH"].split(os.pathsep):
        for f in Path(d).glob("*") if Path(d).is_dir() else []:
            if f.name not in slurm_cmds and not (bin_dir / f.name).exists():
                (bin_dir / f.name).symlink_to(f)
    root = copy_repo(tmp_path / "repo", committed=())
    env = {**os.environ, "PATH": f"{BIN}:{bin_dir}"}
    assert shutil.which("sbatch", path=env["PATH"]) is None
    cmd = ["--profile", "slurm-gpu", "--slurm-init-seconds-before-status-checks", "2"]
    rc, out = bounded(cmd, root, env, limit=120)
    assert rc not in (None, 0), out[-3000:]
    tail = out[-1500:]
    assert "sbatch" in tail and "not on PATH" in tail, tail
    assert "No such file or directory: 'sacct'" not in out


SACCT = "rule ok:\n    output: 'ok.txt'\n    shell: 'touch {output}'\n"


def test_default_status_command_hangs_without_accounting(cluster_runs):
    """Why the profile says `slurm-status-command: squeue`: with the plugin's default (`sacct`, because the
    binary exists) on a cluster without accounting, the job completes in Slurm and Snakemake never notices.
    If this starts passing through, the plugin learnt to cope and the profile setting is belt and braces."""
    tmp_path, rc, out, _ = cluster_runs[0]["sacct"]
    assert SUBMITTED.search(out), out[-3000:]
    # squeue finishes this in ~15 s (polls at 2, 14 s); killed at LIMIT_S["sacct"]
    assert "JobState=COMPLETED" in cluster_runs[2]["sacct"] and (tmp_path / "ok.txt").exists()
    assert rc is None, f"finished (rc={rc}) despite sacct answering nothing:\n{out[-2000:]}"


# ---- the fan-out: tiers mapped to partitions (config cluster.tiers) ---------------------------------------------
# This cluster has CPU nodes only, so both runs are of the CPU tier (detect rightly refuses a GPU tier here: the
# last test). A tier may list several partitions, one run each (`<run>-<tier>-<partition>`): the same feature that
# lets a site compare one GPU kind across node types stands in here for an A100 and an H100 partition.
FAN = {"local-cpu-cpu": "cpu", "local-cpu-cpu2": "cpu2"}  # run -> partition
# No validation in the fan-out (validate.arms []: the verdict is NOT TESTABLE, both runs alike): a validate job
# costs two Snakemake starts and a fine-tune per run, and is placed by the same per-run resources as bench
# (test_workflow's dry-run fan-out checks validate's partition per run; the plain run validates through sbatch).
FAN_CONFIG = ["arms=[hf_bf16]", "cluster={tiers: {cpu: {partition: [cpu, cpu2]}}}", "validate={arms: []}"]
# What the fan-out tests read: each run up to its provenance, and the report's cross-run view. The per-run plots
# and pages are local rules the plain run already covers.
FAN_TARGETS = [*(f"results/{run}/provenance.json" for run in FAN), "results/_report/tiers.json"]


def run_of(log: Path) -> str:
    """The run a job belonged to, from its Slurm log dir (the plugin names it by the wildcards, run first)."""
    return next(r for r in FAN if log.parent.name == r or log.parent.name.startswith(r + "_"))


WRONG_TARGET = "results/local-h100_80gb/tier.json"


@pytest.fixture(scope="module")
def fanout_run(cluster_runs):
    """The fan-out and, beside it, the GPU tier on a CPU partition (both started by cluster_runs)."""
    (root, rc, out, took), ctld = cluster_runs[0]["fanout"], cluster_runs[1]
    wrong, wrong_rc, wrong_out, _ = cluster_runs[0]["wrong"]
    return root, rc, out, ctld, took, (wrong, wrong_rc, wrong_out)


def test_fanout_sends_each_runs_jobs_to_its_partition(fanout_run):
    root, rc, out, ctld, took, _ = fanout_run
    assert rc is not None, f"killed after {took:.0f} s: the run hung\n{out[-4000:]}"
    assert rc == 0, out[-6000:]
    by_run: dict[str, set[str]] = {}
    for rule, jobs in submissions(out).items():
        assert rule in CLUSTER_RULES, rule
        for jobid, log in jobs:
            run = run_of(log)
            by_run.setdefault(run, set()).add(rule)
            # Slurm's own record: the job was placed on its run's partition and exited 0
            assert partition_of(ctld, jobid) == FAN[run], (rule, run, jobid)
            assert f"_job_complete: JobId={jobid} WEXITSTATUS 0" in ctld, (rule, run, jobid)
    assert by_run == {run: {"detect", "model", "bench"} for run in FAN}
    for run, part in FAN.items():  # what the benchmark process itself saw
        for env in (root / "results" / run / "arms").glob("*/draw*/env.json"):
            assert yaml.safe_load(env.read_text())["env"]["SLURM_JOB_PARTITION"] == part, env
    assert not (root / "results" / "local").exists()  # the fan-out makes only the per-tier runs


def test_fanout_runs_have_the_same_shape_and_are_compared(fanout_run):
    root, rc, out, _, _, _ = fanout_run
    assert rc == 0, out[-3000:]
    a, b = (root / "results" / run for run in FAN)

    def files(d: Path) -> set[str]:
        return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}

    assert files(a) == files(b) and "comparison.md" in files(a) and "provenance.json" in files(a)
    for f in ("model.sha256", "data/data.sha256"):  # same seed, same bytes, whichever partition built it
        assert (a / f).read_text() == (b / f).read_text(), f

    def shape(d: Path) -> set[tuple]:
        return {(x.run_id, x.tier, x.arm, x.metric, x.status, x.unit, x.draw) for x in read_rows(d / "metrics.csv")}

    assert {t[2:] for t in shape(a)} == {t[2:] for t in shape(b)}
    assert {t[:2] for t in shape(a)} == {("local-cpu-cpu", "cpu")}  # each row names its run and tier
    assert any(x.status == "measured" and x.metric == "tokens_per_s" for x in read_rows(b / "metrics.csv"))
    # The report's tier comparison holds both runs (tokens/s and memory), labelled with run and tier.
    t = json.loads((root / "results" / "_report" / "tiers.json").read_text())
    assert {run: "cpu" for run in FAN}.items() <= t["tiers"].items()
    for key in ("bars", "memory"):
        assert {r["run"].split()[0] for r in t[key]} >= set(FAN), key


def test_fanout_tier_on_a_partition_without_its_gpu_stops_at_detect(fanout_run):
    """h100_80gb mapped to a CPU partition: detect runs there, finds no GPU and fails, naming the tier, the node's
    GPU (none) and the partition; nothing is measured under the wrong tier."""
    ctld, (root, rc, out) = fanout_run[3], fanout_run[5]
    assert rc not in (None, 0), out[-3000:]
    (jobid, log), = submissions(out)["detect"]
    assert partition_of(ctld, jobid) == "cpu2"
    assert re.search(rf"_job_complete: JobId={jobid} WEXITSTATUS [1-9]", ctld)
    text = log.read_text()
    assert "tier 'h100_80gb' is forced, but this node has no GPU" in text and "SLURM_JOB_PARTITION=cpu2" in text, text
    assert not (root / WRONG_TARGET).exists()
