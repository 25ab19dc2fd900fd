"""Shared fixtures and the one way tests run Snakemake.

`cpu_run`: the CPU-tier workflow run once per session from a copy of the repo; every test that needs a whole CPU
chain reads that run (or a `clone` of it) instead of building its own.
`in_background(fixture)`: work started as soon as collection shows a selected test uses `fixture` (the CPU chain,
the Slurm module's workflows), so it overlaps the unit tests instead of adding to them.
`snakemake(...)`: the venv's Snakemake in its own process group, killed whole on overrun or at the session's end;
`process(...)` runs any other command so.
`tiny_workdir(...)`: a tiny model, its data and a CPU tier.json for tests that call a stage directly; the model is
built once per session and family and copied.
moebench itself is importable because `make setup` installs it (`pip install -e .`, pyproject.toml).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# One compute thread per torch process (this one, the workflows', the Slurm jobs'): the suite runs several at once
# on 2 cores, where a second thread per tiny-model step costs ~20% more CPU for no speed (a user's setting wins).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Small but real, so the suite stays fast on 2 cores: the default CPU plan with fewer timed steps of 64 tokens (a
# step of 256 costs ~3.5 s on the tiny model, of 64 ~0.3 s), 12 conversations (one held out: validate's two
# held-out evaluations of 4 conversations cost more than its training) and the short fine-tune
# tests/test_validate.py shows passing every gate (8 steps of 64 tokens; it passes them on this data too).
QUICK = ["--config", "plan_overrides={timed_steps: 3, warmup_steps: 1, draws: 2, seq_len: 64}",
         "data={conversations: 12, seed: 42}",
         "validate={cpu_steps: 8, grad_accum: 1, cpu_seq_len: 64, lr: 3.0e-3, window: 3, warmup_ratio: 0.0, "
         "reload_tokens: 32}"]
# The committed run the CPU chain renders beside its own (report, claims, tier comparison): one real GPU run keeps
# those rules exercised on committed data; all seven would add ~20 jobs. `make run` renders them all.
CPU_RUN_COMMITTED = ("h100-gptoss20b",)
CPU_RUN_LIMIT_S = 900
# The CPU chain gates the tests that read it and the work built on it (the killed-run resume, the report's clone):
# its own run's chain goes before the committed run's pages (Snakemake --prioritize), which only fill its second
# core. (Run at the unit tests' priority instead of niced, it finished ~140 s earlier but slowed the unit tests,
# the suite's serial part, by more: 369 s instead of 350 s.)
CPU_RUN_FIRST = "results/local/provenance.json"
# Its niceness: between the unit tests' (0) and the other background work's (BACKGROUND_NICE, whose tests come
# after it). At 10 it got ~1/4 of the second core beside three or four other background sessions (88 CPU-s took
# ~300 s in the suite, and the tests waited ~35 s for it). Measured with busy loops in the suite's shape (unit
# tests, the run's two jobs, three other sessions at 10; CPU-s in 15 s): at 10 the run got 3.7 and the unit tests
# 14.9; at 5, 6.9 and 13.9; at 0, 11.4 and 12.1. Once a test waits on it, it gets 0 (boost).
CPU_RUN_NICE = 5


def copy_repo(dest: Path, committed: tuple[str, ...] | None = None) -> Path:
    """What a fresh clone would hold: tracked files and untracked ones git does not ignore. `committed`: the
    committed runs (results/<run>/) to keep, None for all; the default target renders every run it finds, so a
    test that checks only its own run leaves the others out."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for f in filter(None, files):
        src = ROOT / f
        run = f.split("/")[1] if f.startswith("results/") and f.count("/") > 1 else None
        if run and committed is not None and run not in committed:
            continue
        if src.is_file() and not f.startswith("results/local"):
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


# ---- running Snakemake --------------------------------------------------------------------------------------
class Ran(subprocess.CompletedProcess):
    """A finished Snakemake: returncode is None when it was killed at its time limit."""

    @property
    def out(self) -> str:
        return (self.stdout or "") + (self.stderr or "")

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def venv_env(**extra: str) -> dict:
    """This environment with the venv's bin first on PATH (rules call `python -m moebench...`), plus `extra`."""
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


# Snakemakes still running: the session's end kills them (a background one may outlive an early stop, e.g. -x).
_LIVE: set[subprocess.Popen] = set()
_ENDED = threading.Event()  # set at the session's end: a background thread starts no Snakemake after it
_WORK = threading.local()  # .fixture: the background() work this thread runs
_OWNED: dict[str, list[subprocess.Popen]] = {}  # background() work -> the processes it started
_WAITED_ON: set[str] = set()  # background() work a test waits on: what it starts from then on runs at nice 0


def _niceness(nice: int) -> int:
    return 0 if getattr(_WORK, "fixture", None) in _WAITED_ON else nice


def _started(p: subprocess.Popen, nice: int) -> None:
    """A process snakemake() or process() started: killed at the session's end, its session reniced, and owned by
    the background() work that started it (boosted when a test waits on that work)."""
    _LIVE.add(p)
    renice_session(p.pid, nice)
    work = getattr(_WORK, "fixture", None)
    if work:
        _OWNED.setdefault(work, []).append(p)
        if nice and work in _WAITED_ON:  # the test began to wait while it started (the waiter may not see it)
            boost(p.pid)


# Niceness of background work (in_background): the test being run keeps a core to itself instead of sharing it
# with every job of the background workflows, which take what it leaves.
BACKGROUND_NICE = 10
# Niceness of a test's own processes run in the background (a stage's `python -m`, a snippet) without a timeout of
# seconds to meet: their tests come last, so they take what the others leave, the CPU run's first.
SLACK_NICE = 15


def snakemake(cwd: Path, *args: str, timeout: float = 600, env: dict | None = None, wait: bool = True,
              nice: int = 0):
    """Run the venv's `snakemake *args` in `cwd`, in a process group of its own (env: venv_env() by default),
    at niceness `nice` (BACKGROUND_NICE for background work). Returns a Ran; past `timeout` the whole group gets
    SIGKILL (a hung Snakemake ignores SIGTERM) and returncode is None. wait=False starts it and returns the Popen
    (output to cwd/snakemake.out), for tests that kill it."""
    if wait:
        return process([str(BIN / "snakemake"), *args], cwd, timeout=timeout, env=env, nice=nice)
    nice = _niceness(nice)
    cmd = [*(["nice", "-n", str(nice)] if nice else []), str(BIN / "snakemake"), *args]  # nice execs: same pid
    if _ENDED.is_set():  # a background() thread of a stopped session: nothing would kill this one
        raise RuntimeError(f"the test session has ended; not starting {cmd}")
    with open(Path(cwd) / "snakemake.out", "w") as log:
        p = subprocess.Popen(cmd, cwd=cwd, env=venv_env() if env is None else env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    _started(p, nice)
    return p


def process(cmd: list[str], cwd: Path, timeout: float = 600, env: dict | None = None, nice: int = 0) -> Ran:
    """Run `cmd` as snakemake() runs Snakemake (its own process group, niceness `nice`, killed whole past
    `timeout` or at the session's end): for other background work, e.g. a stage run as `python -m`."""
    nice = _niceness(nice)
    cmd = [*(["nice", "-n", str(nice)] if nice else []), *cmd]  # nice execs: same pid
    if _ENDED.is_set():  # a background() thread of a stopped session: nothing would kill this one
        raise RuntimeError(f"the test session has ended; not starting {cmd}")
    env = venv_env() if env is None else env
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    _started(p, nice)
    try:
        out, err = p.communicate(timeout=timeout)
        return Ran(cmd, p.returncode, out, err)
    except subprocess.TimeoutExpired:
        kill_group(p)
        out, err = p.communicate()
        return Ran(cmd, None, out, err)
    finally:
        _LIVE.discard(p)


def renice_session(pid: int, nice: int) -> None:
    """Give the session `pid` leads (its autogroup) niceness `nice`. With the kernel's autogroups on (the default),
    a process's own nice only ranks it inside its session: each new session, e.g. a Snakemake started here or a
    Slurm job, would otherwise get as much CPU as the whole test session."""
    if nice:
        try:
            Path(f"/proc/{pid}/autogroup").write_text(str(nice))
        except OSError:  # no autogroups here (then plain nice applies) or the process is gone
            pass


def descendants(pid: int) -> list[int]:
    """The live processes below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_group(p: subprocess.Popen) -> None:
    """SIGKILL a process started by snakemake() and everything it started."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait(timeout=30)
    _LIVE.discard(p)


# ---- work that runs beside the unit tests ------------------------------------------------------------------------
_STARTERS: dict[str, object] = {}  # fixture name -> what starts its work
_AT_END: list = []  # callables the session's end runs (after killing live Snakemakes), e.g. stopping a cluster


def in_background(fixture: str):
    """Decorator: call the function (with the session's tmp_path_factory) at the end of collection when a selected
    test uses `fixture`, so the work it starts (a workflow, a cluster) runs beside the unit tests; the fixture then
    waits for it. The function must start the work without waiting for it, and be safe to call twice."""
    def register(start):
        _STARTERS[fixture] = start
        return start
    return register


def at_session_end(fn) -> None:
    """Run `fn()` when the session ends, however it ends (background work a stopped session never waited for)."""
    _AT_END.append(fn)


_THREADS: dict[str, dict] = {}  # background(): fixture name -> its thread and, once done, "value" or "error"


def background(fixture: str, scope: str = "module"):
    """Decorator: `work(tmp_path_factory)` becomes the fixture `fixture`, whose work starts in a thread at the end of
    collection (in_background) and whose value the fixture waits for. For a test's Snakemake runs (started with
    nice=BACKGROUND_NICE) that need nothing from other tests: they overlap the unit tests, and the test asserts
    on what they returned. An exception in `work` is raised by the fixture. Once a test waits on the work, the
    processes it started with snakemake() or process() run at nice 0 (boost), and so do those it starts later."""
    def wrap(work):
        def start(tmp_path_factory) -> None:
            if fixture in _THREADS:
                return
            tmp_path_factory.getbasetemp()  # made here: its lazy first call is not thread-safe (two basetemps)
            box: dict = {}

            def run():
                _WORK.fixture = fixture
                try:
                    box["value"] = work(tmp_path_factory)
                except BaseException as e:  # handed to the fixture
                    box["error"] = e
                finally:
                    _mark(fixture, done=_now())

            box["thread"] = threading.Thread(target=run, name=fixture, daemon=True)
            _THREADS[fixture] = box
            _mark(fixture, started=_now())
            box["thread"].start()

        in_background(fixture)(start)

        @pytest.fixture(scope=scope, name=fixture)
        def waited(tmp_path_factory):
            start(tmp_path_factory)  # a no-op when collection started it
            box, t = _THREADS[fixture], time.time()
            if box["thread"].is_alive():  # the test waits on it: it runs first from now on
                _WAITED_ON.add(fixture)
                for p in _OWNED.get(fixture, []):
                    if p.poll() is None:
                        boost(p.pid)
            box["thread"].join()
            _mark(fixture, waited=round(time.time() - t, 1))
            if "error" in box:
                raise box["error"]
            return box["value"]
        return waited
    return wrap


# ---- where the session's time went: printed at its end --------------------------------------------------------
_T0 = time.time()


def _cpu_times() -> tuple[int, int]:
    """(busy, all) CPU time of this host since boot, in ticks (/proc/stat; zeros where there is none)."""
    try:
        ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)  # idle, iowait


_CPU0 = _cpu_times()
_TIMELINE: dict[str, dict] = {"unit tests": {"started": 0.0}}  # what -> started/done/waited, s since _T0


def _now() -> float:
    return round(time.time() - _T0, 1)


def _mark(what: str, **times: float) -> None:
    _TIMELINE.setdefault(what, {}).update(times)


def pytest_runtest_setup(item):
    """The first test that needs background work (they run last): the unit tests are done."""
    if "done" not in _TIMELINE["unit tests"] and any(f in _STARTERS for f in getattr(item, "fixturenames", ())):
        _mark("unit tests", done=_now())


def pytest_terminal_summary(terminalreporter):
    """How busy the host's cores were, when the background work finished and how long the tests waited for it:
    the session's critical path (the tests' own durations: --durations)."""
    busy, total = (now - then for now, then in zip(_cpu_times(), _CPU0))
    if len(_TIMELINE) == 1 or not total:
        return
    wall, cores = time.time() - _T0, os.cpu_count() or 1
    tr = terminalreporter
    tr.write_sep("-", "time line (s since conftest was imported)")
    tr.write_line(f"{cores} cores busy {busy / total:.0%} of {wall:.0f} s: {(total - busy) / total * wall * cores:.0f} "
                  "core-s idle (the whole host)")
    for what, t in _TIMELINE.items():
        tr.write_line(f"{what}: started {t.get('started', '?')}, done {t.get('done', '?')}"
                      + (f", a test waited {t['waited']} s for it" if t.get("waited") else ""))


# ---- the one CPU chain ---------------------------------------------------------------------------------------
_CPU_RUN: dict = {}


@in_background("cpu_run")
def _start_cpu_run(tmp_path_factory=None) -> None:  # its own temp dir: removed once the run has passed
    if _CPU_RUN:
        return
    root = copy_repo(Path(tempfile.mkdtemp(prefix="moebench-cpu-run-")) / "cpu-run", committed=CPU_RUN_COMMITTED)
    _CPU_RUN.update(root=root, t0=time.time(),
                    proc=snakemake(root, "--cores", "2", "--prioritize", CPU_RUN_FIRST, *QUICK, wait=False,
                                   nice=CPU_RUN_NICE))
    _mark("cpu_run", started=_now())
    threading.Thread(target=_note_end, args=(_CPU_RUN["proc"], "cpu_run"), daemon=True).start()


def _note_end(p: subprocess.Popen, what: str) -> None:
    p.wait()
    _mark(what, done=_now())


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by fixture scope
def pytest_collection_modifyitems(session, config, items):
    """Start the background work of every fixture a selected test uses (in_background), and move the tests that
    wait on it to the end, in the order the work was registered (the CPU chain first): the other tests run
    meanwhile instead of a test waiting with a core idle."""
    rank = {fixture: i for i, fixture in enumerate(_STARTERS, 1)}
    items.sort(key=lambda item: max((rank[f] for f in getattr(item, "fixturenames", ()) if f in rank), default=0))
    if config.option.collectonly:
        return
    config._tmp_path_factory.getbasetemp()  # made before any thread: its lazy first call is not thread-safe
    for fixture, start in _STARTERS.items():
        if any(fixture in getattr(item, "fixturenames", ()) for item in items):
            start(config._tmp_path_factory)  # what the tmp_path_factory fixture returns


def pytest_sessionfinish(session, exitstatus):
    _ENDED.set()
    stopped = bool(_CPU_RUN) and _CPU_RUN["proc"].poll() is None  # e.g. -x ended the session before a test waited
    for p in list(_LIVE):
        if p.poll() is None:  # not yet reaped, so its pid (and group) is still ours
            kill_group(p)
    for fn in _AT_END:
        fn()
    if _CPU_RUN and (stopped or _CPU_RUN["proc"].returncode == 0):  # a failed run stays for inspection
        shutil.rmtree(_CPU_RUN["root"].parent, ignore_errors=True)


@pytest.fixture(scope="session")
def cpu_run() -> Path:
    """The CPU-tier workflow (QUICK plan) run once from a copy of the repo; returns that copy's root.
    Read it, never write to it: other tests share it (conftest.clone copies it to build more)."""
    _start_cpu_run()  # a no-op when collection started it
    if _CPU_RUN["proc"].poll() is None:  # the tests waiting on it run last: nothing else is in the foreground now
        boost(_CPU_RUN["proc"].pid)
    t = time.time()
    root = wait_cpu_run()
    _mark("cpu_run", waited=round(time.time() - t, 1))
    return root


def boost(pid: int) -> None:
    """Give the background work `pid` leads (its session: autogroup, process group) the unit tests' priority, from
    now on: a test waits on it, so the work the other background runs do has time until their tests come. As root
    only (raising a priority is); elsewhere it keeps its niceness."""
    try:
        Path(f"/proc/{pid}/autogroup").write_text("0")
    except OSError:  # no autogroups here (then the process group's nice is what counts) or not root
        pass
    try:
        os.setpriority(os.PRIO_PGRP, pid, 0)  # start_new_session: its process group id is its pid
    except OSError:
        pass


def wait_cpu_run() -> Path:
    """What the cpu_run fixture returns, for background work that builds on it (background()): waits for the run,
    raises AssertionError with its log when it failed."""
    _start_cpu_run()  # a no-op when collection started it
    p, root = _CPU_RUN["proc"], _CPU_RUN["root"]
    try:
        p.wait(timeout=max(1.0, CPU_RUN_LIMIT_S - (time.time() - _CPU_RUN["t0"])))
        how = f"failed (exit {p.returncode})"
    except subprocess.TimeoutExpired:
        kill_group(p)
        how = f"was killed after {CPU_RUN_LIMIT_S} s"
    log = (root / "snakemake.out").read_text(errors="replace")
    assert p.returncode == 0, f"CPU workflow run in {root} {how}:\n{log[-6000:]}"
    return root


def clone(src: Path, dest: Path) -> Path:
    """A copy of a workflow directory (e.g. cpu_run) with its results and Snakemake's records (.snakemake/metadata;
    mtimes kept), so Snakemake in the copy finds the same jobs done and builds only what a test adds. Run it with
    the same config (QUICK for cpu_run): a changed config reruns the stages whose settings changed."""
    skip = shutil.ignore_patterns("locks", "incomplete", "snakemake.out", "__pycache__")
    return Path(shutil.copytree(src, dest, symlinks=True, ignore=skip, dirs_exist_ok=True))


# ---- a tiny model and its data, for tests that call a stage directly -------------------------------------------
_TINY_MODELS: dict[str, Path] = {}
_TINY_LOCK = threading.Lock()  # background work (e.g. test_bench's draws) builds them in a thread too


def _tiny_model(model: str) -> Path:
    """The tiny random-init `model`, built once per session (same seed, same bytes) and copied by callers."""
    with _TINY_LOCK:
        return _TINY_MODELS.get(model) or _build_tiny_model(model)


def tiny_model(model: str = "gpt-oss-20b") -> Path:
    """The session's tiny random-init `model` (models.build with seed 42 on data.corpus_text(60, 42)), for tests
    that only read it: never write there (tiny_workdir copies it)."""
    return _tiny_model(model)


def _build_tiny_model(model: str) -> Path:
    from moebench import config as cfgmod
    from moebench import data, models
    from moebench.io import logger

    out = Path(tempfile.mkdtemp(prefix=f"moebench-tiny-{model}-")) / "model"
    spec = cfgmod.load_yaml("models.yaml")[model]
    models.build(spec, "tiny", "random-init", str(out), 42, data.corpus_text(60, 42), logger("t"))
    _TINY_MODELS[model] = out
    return out


def tiny_workdir(d: Path, model: str = "gpt-oss-20b", conversations: int = 30, **plan) -> dict:
    """A tiny random-init `model`, its data and a CPU tier.json (plan overridden by `plan`) in `d`, as the
    workflow lays them out: what the harness and validation tests train on. Returns the tier document."""
    from moebench import config as cfgmod
    from moebench import data
    from moebench.io import logger, write_json

    shutil.copytree(_tiny_model(model), d / "model")
    data.build(str(d / "model"), conversations, 42, 0.1, str(d / "data"), logger("t"))
    tier = {"tier": "cpu", "gpu": None, "plan": {**cfgmod.load_yaml("tiers.yaml")["cpu"]["plan"], **plan}}
    write_json(d / "tier.json", tier)
    return tier


@pytest.fixture(scope="session", autouse=True)
def _drop_tiny_models():
    yield
    for path in _TINY_MODELS.values():
        shutil.rmtree(path.parent, ignore_errors=True)
