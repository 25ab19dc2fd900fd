"""The measuring harness every measuring stage shares (bench, offload, validate): the process context that labels
rows, the time limit and heartbeat, the guard that turns an arm that cannot run into `skipped` rows and one that
crashes into `failed` rows, the environment record, and the common steps (load through the arm, feed packed
token blocks, one training step).

A stage imports this module, never another stage.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from . import arms as arm_registry
from . import inspect
from .io import package_versions
from .metrics import Row

PACKAGES = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo", "trl",
            "experts4bit-qlora", "grouped-nf4-gemm", "triton", "nvidia-ml-py"]
ENV_PREFIXES = ("UNSLOTH", "E4B", "CUDA_VISIBLE", "OFFLOAD", "TORCH_LOGS", "SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURMD_NODENAME")


@dataclass
class Ctx:
    """Everything one process needs to label its rows (bench, offload and validate share it)."""
    run_id: str
    tier: str
    model: str
    arm: str
    precision: str
    draw: int | None
    log_path: str
    rows: list[Row] = field(default_factory=list)
    stage: str = "bench"
    conditions: dict = field(default_factory=dict)  # what the draw really ran under: env.json's `conditions`

    def add(self, metric, value=None, unit="", status="measured", reason="", n=None, spread=None, stage=None):
        """A number that is not finite cannot be a measured row: it becomes a failed one that says so."""
        if status == "measured" and (value is None or (isinstance(value, float) and not math.isfinite(value))):
            status, reason = "failed", f"not a finite number ({value})"
        r = Row(self.run_id, self.tier, self.model, self.arm, self.precision, stage or self.stage, metric, value, unit,
                n, spread, status, reason, self.log_path, self.draw)
        self.rows.append(r)
        return r

    def row_kwargs(self) -> dict:
        """The labels of this process's rows, for modules that build Rows themselves (energy, offload)."""
        return {"run_id": self.run_id, "tier": self.tier, "model": self.model, "arm": self.arm,
                "precision": self.precision, "source": self.log_path, "draw": self.draw}


# ---- what a measurement ran on ----------------------------------------------------------------------------
def versions() -> dict:
    return package_versions(PACKAGES)


def environment(started: str, tier: dict) -> dict:
    """What a measurement ran on and with: stored beside its rows so each result describes itself."""
    return {"started": started, "ended": datetime.now(timezone.utc).isoformat(), "python": sys.version,
            "platform": platform.platform(), "packages": versions(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)},
            "plan": tier["plan"], "gpu": tier.get("gpu"), "host": host()}


def host() -> dict:
    """Which machine ran this process: arms of one run measured on different machines (or leases) compare the
    machines as well as the stacks, and the aggregate says so when these differ."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = None
    gpu_uuid = None
    if "torch" in sys.modules:  # never import torch just for this (the CPU tests run without it loaded)
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            gpu_uuid = str(getattr(torch.cuda.get_device_properties(0), "uuid", "")) or None
    return {"hostname": platform.node(), "boot_id": boot_id, "gpu_uuid": gpu_uuid}


# ---- time limit and heartbeat -----------------------------------------------------------------------------
class ArmTimeout(Exception):
    pass


class Progress:
    """Where a draw is: logged every `every` seconds while one phase lasts (a first step can compile for
    minutes, and a silent log looks hung) and named in a timeout's message."""

    def __init__(self, log, every: float = 60.0, phase: str = "loading the model"):
        self.log, self.every = log, every
        self.enter(phase)

    def enter(self, phase: str) -> None:
        self.phase, self.since = phase, time.monotonic()

    def __str__(self) -> str:
        return f"{self.phase}, {time.monotonic() - self.since:.0f} s in"

    @contextmanager
    def beating(self):
        stop = threading.Event()

        def beat():
            while not stop.wait(self.every):
                self.log.info("still working: %s", self)

        thread = threading.Thread(target=beat, name="progress", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=1)


@contextmanager
def time_limit(seconds: int, progress: Progress | None = None, setting: str = "arm_timeout_s"):
    """Stop a draw that overruns (a slow load can eat a GPU lease); it becomes a failed row saying where, and
    which config `setting` to raise."""
    def fire(signum, frame):
        where = f" (in {progress})" if progress else ""
        raise ArmTimeout(f"draw exceeded {setting}={seconds} s{where}")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextmanager
def watched(seconds: int, log, phase: str = "loading the model", setting: str = "arm_timeout_s"):
    """A measuring process's time limit and its heartbeat, sharing one Progress (yielded, so the work can name
    its phases): a timeout then says where it struck, and a long phase shows in the log while it lasts."""
    progress = Progress(log, phase=phase)
    with time_limit(seconds, progress, setting), progress.beating():
        yield progress


# ---- degraded paths: console lines that announce a fallback -------------------------------------------------
# moebench's own log records (logging's format here, or the `[name|LEVEL]` form Unsloth gives every logger) quote
# reasons such as a refusal's "no quant_state found": they are reports about a path, never the path itself.
OWN_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ |\[)(bench|offload|validate|sweep)[ |][A-Z]+[ \]]")
RECOMPILE = re.compile(r"Recompiling function (\S+ in \S+)")  # TORCH_LOGS=recompiles, one line per recompile


class ConsoleMatcher:
    """Feeds console lines, one at a time, against an arm's fallback patterns; counts recompiles per function.
    Keeps the first `keep` matched lines (all when None) and how many matched in all."""

    def __init__(self, patterns: list[str], recompile_limit: int | None = None, keep: int | None = None):
        self.regexes = []
        for p in patterns:
            try:
                self.regexes.append(re.compile(p))
            except re.error as exc:
                raise ValueError(f"degraded_patterns: {p!r} is not a regular expression ({exc}); fix it in the "
                                 "config") from None
        self.limit, self.keep = recompile_limit, keep
        self.lines: list[str] = []
        self.count = 0
        self.recompiles: dict[str, int] = {}
        self._lock = threading.Lock()

    def feed(self, line: str) -> None:
        line = line.rstrip("\r\n")
        if not line or OWN_LINE.match(line):
            return
        with self._lock:
            m = RECOMPILE.search(line)
            if m:
                self.recompiles[m.group(1)] = self.recompiles.get(m.group(1), 0) + 1
            if any(r.search(line) for r in self.regexes):
                self.count += 1
                if self.keep is None or len(self.lines) < self.keep:
                    self.lines.append(line.strip()[:600])

    def matches(self) -> list[str]:
        """The matched lines, then one line per function recompiled more than the limit allows."""
        storms = [f"torch recompiled {fn} {n} times (recompile_limit {self.limit})"
                  for fn, n in self.recompiles.items() if self.limit is not None and n > self.limit]
        return self.lines + storms


def degraded_matches(text: str, patterns: list[str], recompile_limit: int | None = None) -> list[str]:
    """Every console line of `text` that announces a fallback path (and every recompile storm): [] if none."""
    m = ConsoleMatcher(patterns, recompile_limit)
    for line in text.splitlines():
        m.feed(line)
    return m.matches()


def arm_patterns(cfg: dict, arm: str) -> list[str]:
    """The fallback patterns an arm declares in config (`degraded_patterns`), with those for `all` arms."""
    pats = cfg.get("degraded_patterns") or {}
    return list(pats.get(arm, [])) + list(pats.get("all", []))


class ConsoleTap:
    """Sees everything this process prints, third-party prints and child processes included: file descriptors 1
    and 2 go through pipes whose reader threads write each chunk on to the original descriptor (the rule's
    `tee console.log` still gets all of it) and feed its lines to a ConsoleMatcher."""

    def __init__(self, matcher: ConsoleMatcher):
        self.matcher, self._streams = matcher, []

    def __enter__(self):
        for f in (sys.stdout, sys.stderr):
            f.flush()
        for fd in (1, 2):
            saved = os.dup(fd)
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            t = threading.Thread(target=self._pump, args=(r, saved), name=f"console-tap-{fd}", daemon=True)
            t.start()
            self._streams.append((fd, saved, r, t))
        return self

    def _pump(self, r: int, out: int) -> None:
        buf = b""
        while True:
            try:
                chunk = os.read(r, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            try:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(out, view):]
            except OSError:
                pass  # the reader of our output went away: keep draining, so the process never blocks
            *lines, buf = (buf + chunk).split(b"\n")
            if len(buf) > 1 << 20:  # a progress bar redrawn with \r for ever: look at it, drop it
                lines, buf = lines + [buf], b""
            for line in lines:
                try:
                    self.matcher.feed(line.decode(errors="replace"))
                except Exception:  # noqa: BLE001 - never let matching stop the pass-through
                    pass
        if buf:
            self.matcher.feed(buf.decode(errors="replace"))

    def __exit__(self, *exc):
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        for fd, saved, _, _ in self._streams:
            os.dup2(saved, fd)  # the pipe's last writer closes here, unless a child process still holds it
        for fd, saved, r, t in self._streams:
            t.join(timeout=5)
            if not t.is_alive():  # a lingering child keeps its pipe: leave it to the daemon thread
                os.close(r)
                os.close(saved)
        self._streams = []
        return False


def console_reason(matches: list[str]) -> str | None:
    """The reason a draw whose console matched is degraded: the first matched line and how many more."""
    if not matches:
        return None
    return f"console: {matches[0][:300]}" + (f" (+{len(matches) - 1} more)" if len(matches) > 1 else "")


def mark_degraded(ctx: Ctx, reason: str | None) -> None:
    """A draw measured on a fallback path (or a shared GPU): its measured rows become `degraded` with `reason`;
    the values stay."""
    for r in ctx.rows if reason else ():
        if r.status == "measured":
            r.status, r.reason = "degraded", reason


# ---- device isolation and spread --------------------------------------------------------------------------
def _own_gpu(nvml):
    """The NVML handle of the GPU this process will use: CUDA_VISIBLE_DEVICES' first entry (index or UUID) when
    NVML can see it, else GPU 0 (a Slurm cgroup shows NVML only the allocated GPU)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if first.startswith(("GPU-", "MIG-")):
        return nvml.nvmlDeviceGetHandleByUUID(first)
    index = int(first) if first.isdigit() and int(first) < nvml.nvmlDeviceGetCount() else 0
    return nvml.nvmlDeviceGetHandleByIndex(index)


def _others(nvml, handle) -> list[str]:
    me = os.getpid()
    procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    return [f"pid {p.pid} ({(getattr(p, 'usedGpuMemory', None) or 0) / 1e9:.1f} GB)" for p in procs if p.pid != me]


def isolate(ctx: Ctx, wait_s: float, log, nvml=None, sleep=time.sleep, clock=time.monotonic) -> str | None:
    """Before a GPU draw: wait up to `wait_s` for other processes on this GPU (NVML) to leave. Records
    `gpu_other_processes` (and how long it waited); returns a degraded reason when some stayed (the draw is
    timed anyway), None when the GPU was ours or NVML cannot list processes (then the row is `unavailable`)."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
        handle = _own_gpu(nvml)
        t0 = clock()
        others = _others(nvml, handle)
        while others and clock() - t0 < wait_s:
            sleep(1.0)
            others = _others(nvml, handle)
    except Exception as exc:  # noqa: BLE001 - no NVML, or a driver that will not list processes
        ctx.add("gpu_other_processes", status="unavailable",
                reason=f"unknown: NVML cannot list the processes on this GPU ({type(exc).__name__}: {exc})"[:300])
        return None
    waited = clock() - t0
    ctx.add("gpu_isolation_wait_s", waited, "s")
    ctx.add("gpu_other_processes", len(others), "processes")
    if not others:
        return None
    reason = (f"GPU shared: {len(others)} other process(es) still on it after isolation_wait_s={wait_s:g} s: "
              + ", ".join(others[:5]))
    log.warning("%s; timing anyway", reason)
    return reason


def spread_rows(ctx: Ctx, limit: float, log) -> None:
    """Flag (not drop) a draw whose timed step times spread: IQR/median of step_s above `limit` gives
    `spread_flag` 1 with the ratio in its reason, else 0; `step_iqr_over_median` holds the ratio."""
    step = next((r for r in ctx.rows if r.metric == "step_s" and r.status == "measured"), None)
    if step is None or step.spread is None or not step.value:
        return
    ratio = step.spread / step.value
    ctx.add("step_iqr_over_median", ratio, "fraction", n=step.n)
    flagged = ratio > limit
    why = f"step-time IQR/median {ratio:.3f} > spread_limit {limit:g}: this draw's steps were not steady" if flagged \
        else ""
    if flagged:
        log.warning("%s", why)
    ctx.add("spread_flag", 1 if flagged else 0, "flag", n=step.n, reason=why)


# ---- skipped / failed rows --------------------------------------------------------------------------------
def is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError, or an allocator error that only says so in its message (bitsandbytes, triton)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return "out of memory" in str(exc).lower()


def failure_reason(exc: BaseException) -> str:
    """A failed row's reason: OOM or the exception's type, then the first line of its message."""
    kind = "OOM" if is_oom(exc) else type(exc).__name__
    return f"{kind}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


@dataclass
class Outcome:
    status: str  # measured / skipped / failed
    reason: str = ""
    result: Any = None  # what the body returned (measured only)


def guarded(ctx: Ctx, log, body: Callable[[Progress], Any], seconds: int, *, skip: str | None = None,
            metric: str = "step_s", stage: str | None = None, phase: str = "loading the model",
            setting: str = "arm_timeout_s") -> Outcome:
    """Run one measuring body under the time limit and heartbeat; never raises for the arm's sake.

    `skip` (a reason found before anything heavy ran), or ArmUnavailable raised by the arm, gives a `skipped`
    row for `metric`; any other exception (OOM, crash, timeout) a `failed` row with the error, on `metric`, or
    on `error` when `metric` was already recorded (rows measured before the failure stay: memory after load is
    telling when a step runs out of memory)."""
    if skip:
        log.info("skipped: %s", skip)
        ctx.add(metric, status="skipped", reason=skip, stage=stage)
        return Outcome("skipped", skip)
    try:
        with watched(seconds, log, phase=phase, setting=setting) as progress:
            return Outcome("measured", "", body(progress))
    except arm_registry.ArmUnavailable as exc:  # the arm itself found it cannot run here: say why
        log.info("skipped at load: %s", exc)
        reason = str(exc)[:600]
        ctx.add(metric, status="skipped", reason=reason, stage=stage)
        return Outcome("skipped", reason)
    except Exception as exc:  # noqa: BLE001 - a failed draw is a row, the workflow goes on
        log.error("failed: %s\n%s", exc, traceback.format_exc())
        reason = failure_reason(exc)
        done = any(r.metric == metric for r in ctx.rows)
        ctx.add("error" if done else metric, status="failed", reason=reason, stage=stage)
        return Outcome("failed", reason)


def unavailable(arm, plan: dict, cuda: bool, model_dir: str | None = None) -> str | None:
    """Why the arm cannot run here, found before its process imports anything heavy (None if it can)."""
    reason = arm.unavailable_reason(cuda)
    if reason is None and model_dir:
        reason = arm.refusal(model_dir, plan)
    if reason is None and arm.precision == "bf16" and not plan.get("bf16_viable", True):
        reason = f"{arm.name}: bf16 weights do not fit this tier's memory (tier plan: bf16_viable false)"
    return reason


# ---- the common steps: LoRA spec, load, inputs, one training step -----------------------------------------
def lora_spec(cfg: dict) -> arm_registry.LoRASpec:
    lo = cfg["lora"]
    return arm_registry.LoRASpec(lo["r"], lo["alpha"], lo.get("dropout", 0.0), tuple(lo.get("attention", ())),
                                 lo.get("experts", True))


def read_texts(path: str) -> list[str]:
    """The rendered conversations of a train/held-out .jsonl (one {"text": ...} per line)."""
    return [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """The conversations as one token stream, each closed by EOS: what bench and validate both pack."""
    eos = tokenizer.eos_token_id
    return [i for t in texts for i in tokenizer(t)["input_ids"] + [eos]]


def batches(data_path: str, tokenizer, seq_len: int, batch: int, count: int, seed: int):
    """Pack the rendered conversations into one token stream and cut it into [batch, seq_len] blocks: every
    position is a real token (no padding, never zeros). Cycles through the stream when it is short."""
    import torch

    stream = token_stream(tokenizer, read_texts(data_path))
    need = seq_len * batch
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(stream, dtype=torch.long)
    while ids.numel() < need + 1:
        ids = torch.cat([ids, ids])
    for _ in range(count):
        start = int(torch.randint(0, ids.numel() - need, (1,), generator=g))
        yield ids[start:start + need].view(batch, seq_len)


def make_inputs(model_dir: str, data_path: str, plan: dict, count: int, seed: int, cuda: bool) -> list:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [x.to("cuda" if cuda else "cpu") for x in batches(data_path, tok, plan["seq_len"], plan["batch"], count, seed)]


def train_step(model, opt, x):
    opt.zero_grad(set_to_none=True)  # at the start, so the last step's gradients stay for the expert-LoRA check
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    opt.step()
    return out.loss.detach()


def load_model(ctx: Ctx, arm, cfg: dict, plan: dict, model_dir: str, log, cuda: bool):
    """Load through the arm (timed), then record memory after load and what really got loaded."""
    import torch

    from . import measure

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loaded = arm.load(model_dir, lora_spec(cfg), plan)
    if cuda:
        torch.cuda.synchronize()
    ctx.add("load_s", time.perf_counter() - t0, "s")
    model = loaded.model
    for k, v in measure.memory_now(cuda).items():
        ctx.add(f"{k.removesuffix('_gb')}_after_load_gb", v, "GB")
    census = inspect.census(model)
    log.info("loaded: %s", json.dumps(loaded.info, default=str))
    # Unsloth's GPT-OSS view (interleaved gate/up) applies to GPT-OSS only; other families run what it selected
    gpt_oss = getattr(getattr(loaded.model, "config", None), "model_type", "") == "gpt_oss"
    backend = (loaded.info.get("moe_backend_gpt_oss") if gpt_oss else loaded.info.get("moe_backend_selected")) or \
        loaded.info.get("moe_backend") or loaded.info.get("experts_implementation")
    if backend:  # what really ran, not what was asked for
        ctx.add("moe_backend", str(backend), "")
    log.info("dtype census after load: %s", json.dumps(census))
    ctx.conditions.update(inspect.conditions(model, census, plan))
    ctx.add("trainable_params", sum(p.numel() for p in model.parameters() if p.requires_grad), "params")
    for cat in ("expert", "attention"):
        ctx.add(f"{cat}_weights_gb", inspect.weights_gb(census, cat), "GB")
        ctx.add(f"{cat}_weights_4bit_fraction", inspect.four_bit_fraction(census, cat), "fraction")
    return model
