"""One benchmark draw of one arm, in its own process: load, warm up, time the LoRA training step.

Writes metrics.csv (tidy rows), env.json and run.log into the draw's directory. An arm that cannot run here
gives `skipped` rows; one that crashes or runs out of memory gives `failed` rows: the workflow goes on.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import arms as arm_registry
from . import routing
from . import config as cfgmod
from .io import logger, package_versions, read_json, write_json
from .metrics import Row, log_row, write_rows

PACKAGES = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo", "trl",
            "experts4bit-qlora", "grouped-nf4-gemm", "triton", "nvidia-ml-py"]


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

    def add(self, metric, value=None, unit="", status="measured", reason="", n=None, spread=None, stage=None):
        """A number that is not finite cannot be a measured row: it becomes a failed one that says so."""
        if status == "measured" and (value is None or (isinstance(value, float) and not math.isfinite(value))):
            status, reason = "failed", f"not a finite number ({value})"
        r = Row(self.run_id, self.tier, self.model, self.arm, self.precision, stage or self.stage, metric, value, unit,
                n, spread, status, reason, self.log_path, self.draw)
        self.rows.append(r)
        return r


def versions() -> dict:
    return package_versions(PACKAGES)


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


def unavailable(arm, plan: dict, cuda: bool, model_dir: str | None = None) -> str | None:
    """Why the arm cannot run here, found before its process imports anything heavy (None if it can)."""
    reason = arm.unavailable_reason(cuda)
    if reason is None and model_dir:
        reason = arm.refusal(model_dir, plan)
    if reason is None and arm.precision == "bf16" and not plan.get("bf16_viable", True):
        reason = f"{arm.name}: bf16 weights do not fit this tier's memory (tier plan: bf16_viable false)"
    return reason


def train_step(model, opt, x):
    opt.zero_grad(set_to_none=True)  # at the start, so the last step's gradients stay for the expert-LoRA check
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    opt.step()
    return out.loss.detach()


def lora_spec(cfg: dict) -> arm_registry.LoRASpec:
    lo = cfg["lora"]
    return arm_registry.LoRASpec(lo["r"], lo["alpha"], lo.get("dropout", 0.0), tuple(lo.get("attention", ())),
                                 lo.get("experts", True))


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
    census = measure.dtype_census(model)
    log.info("loaded: %s", json.dumps(loaded.info, default=str))
    # Unsloth's GPT-OSS view (interleaved gate/up) applies to GPT-OSS only; other families run what it selected
    gpt_oss = getattr(getattr(loaded.model, "config", None), "model_type", "") == "gpt_oss"
    backend = (loaded.info.get("moe_backend_gpt_oss") if gpt_oss else loaded.info.get("moe_backend_selected")) or \
        loaded.info.get("moe_backend") or loaded.info.get("experts_implementation")
    if backend:  # what really ran, not what was asked for
        ctx.add("moe_backend", str(backend), "")
    log.info("dtype census after load: %s", json.dumps(census))
    ctx.add("trainable_params", sum(p.numel() for p in model.parameters() if p.requires_grad), "params")
    for cat in ("expert", "attention"):
        gb4 = sum(c["gb"] for dt, c in census.get(cat, {}).items() if dt.startswith("nf4") or dt == "uint8")
        gball = sum(c["gb"] for c in census.get(cat, {}).values())
        ctx.add(f"{cat}_weights_gb", gball, "GB")
        ctx.add(f"{cat}_weights_4bit_fraction", gb4 / gball if gball else 0.0, "fraction")
    return model


def make_inputs(model_dir: str, data_path: str, plan: dict, count: int, seed: int, cuda: bool) -> list:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [x.to("cuda" if cuda else "cpu") for x in batches(data_path, tok, plan["seq_len"], plan["batch"], count, seed)]


def run(ctx: Ctx, arm, cfg: dict, tier: dict, model_dir: str, data_path: str, log, bare_loop: bool,
        progress: Progress | None = None) -> None:
    arm.preimport()  # before transformers: Unsloth patches it at import
    import torch

    from . import energy, measure

    plan, cuda = tier["plan"], torch.cuda.is_available()
    lora = lora_spec(cfg)
    torch.manual_seed(cfg["seed"] + ctx.draw)
    idle = None
    if cuda and cfg.get("idle_baseline_s"):  # before this process puts anything on the GPU
        idle = energy.idle_baseline(cfg["idle_baseline_s"], backend="auto")
        log.info("idle baseline over %.1f s: %s W", cfg["idle_baseline_s"], idle.mean_w)
    model = load_model(ctx, arm, cfg, plan, model_dir, log, cuda)
    trainable = [p for p in model.parameters() if p.requires_grad]
    seq, bsz = plan["seq_len"], plan["batch"]
    steps_warm, steps_timed = plan["warmup_steps"], plan["timed_steps"]
    xs = make_inputs(model_dir, data_path, plan, steps_warm + steps_timed, cfg["seed"] + ctx.draw, cuda)
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    model.train()
    losses = []
    load, warm_s = warmup(model, opt, xs[:steps_warm], losses, log, progress)
    if warm_s:  # compile/autotune cost a user pays once per process: a first step can take minutes
        ctx.add("first_step_s", warm_s[0], "s")
    router_rows(ctx, load)
    if progress:
        progress.enter(f"{steps_timed} timed steps")
    timer = measure.StepTimer(cuda)
    meter = energy.EnergyMeter(backend="auto")
    with meter, energy.ZeusWindow() as zeus:
        for i in range(steps_warm, steps_warm + steps_timed):
            with timer:
                losses.append(train_step(model, opt, xs[i]))
            log.info("timed step %d/%d: %.4f s", i - steps_warm + 1, steps_timed, timer.times[-1])
    s = measure.summary(timer.times)
    tokens = seq * bsz
    ctx.add("step_s", s["median"], "s", n=s["n"], spread=s["iqr"])
    ctx.add("tokens_per_s", tokens / s["median"], "tokens/s", n=s["n"])
    for k, v in measure.memory_peak(cuda).items():
        ctx.add(k, v, "GB")
    loss_vals = [float(v) for v in losses]
    log.info("losses: %s", [round(v, 4) for v in loss_vals])
    ctx.add("loss_first", loss_vals[0], "nats")
    ctx.add("loss_last", loss_vals[-1], "nats")
    check = measure.expert_lora_check(model)
    log.info("expert LoRA check: %s", check)
    for k, v in check.items():
        ctx.add(k, v, "count" if not k.endswith("params") else "params")
    ctx.rows.extend(energy.energy_rows(meter.result, idle, tokens * steps_timed, **_row_kwargs(ctx)))
    if cuda:  # Zeus over the same window: a second implementation to check ours against
        ctx.rows.extend(energy.zeus_rows(meter.result, zeus.result, tokens * steps_timed, **_row_kwargs(ctx)))
    if meter.result.trace:
        energy.write_trace(Path(ctx.log_path).with_name("power.csv"), meter.result)
    cfg_model = model.config if hasattr(model, "config") else None
    if cfg_model is not None and routing.moe_shape(cfg_model)["experts"]:
        fm = measure.FlopModel.from_config(cfg_model, lora.r, lora.experts)
        flops = fm.step_flops(tokens, seq, recompute=bool(plan.get("gradient_checkpointing")))
        ctx.add("model_tflop_per_step", flops / 1e12, "TFLOP")
        if cuda:
            rate = measure.matmul_tflops()
            ctx.add("matmul_bf16_tflops", rate, "TFLOP/s")
            ctx.add("mfu_vs_measured_matmul", flops / s["median"] / 1e12 / rate, "fraction")
            if plan.get("datasheet_bf16_tflops"):
                ctx.add("mfu_vs_datasheet", flops / s["median"] / 1e12 / plan["datasheet_bf16_tflops"], "fraction")
    if bare_loop:
        bare = bare_loop_step_s(model, opt, xs[steps_warm:], cuda)
        ctx.add("bare_loop_step_s", bare, "s", n=len(xs) - steps_warm)
        ctx.add("harness_over_bare", s["median"] / bare, "ratio")


def warmup(model, opt, xs, losses: list, log, progress: Progress | None = None):
    """The untimed warm-up steps, counting which experts the routers pick (hooks stay out of the timed window).
    Returns the router load and each step's wall time (the first holds any compile/autotune)."""
    load = routing.RouterLoad.of(model)
    load.counting = True
    times = []
    for i, x in enumerate(xs):
        if progress:
            progress.enter(f"warm-up step {i + 1}/{len(xs)}")
        t = time.perf_counter()
        losses.append(train_step(model, opt, x))
        float(losses[-1])  # waits for the step, so the time is the step's and not its launch's
        times.append(time.perf_counter() - t)
        log.info("warm-up step %d/%d: %.1f s", i + 1, len(xs), times[-1])
    load.remove()
    return load, times


def router_rows(ctx: Ctx, load: "routing.RouterLoad") -> None:
    """Expert load the arm really routed in its warm-up steps: the skew the comparison ran under."""
    overall = load.overall()
    if not overall:
        ctx.add("router_max_over_mean", status="unavailable",
                reason="no router module (mlp.router / mlp.gate) reported its top-k choice in this arm's forward")
        return
    ctx.add("router_max_over_mean", overall["max_over_mean"], "ratio", n=overall["layers"])
    ctx.add("router_max_over_mean_worst_layer", overall["max_over_mean_worst"], "ratio", n=overall["layers"])
    ctx.add("router_entropy_norm", overall["entropy_norm"], "fraction of log E", n=overall["layers"])
    ctx.add("router_unused_experts", overall["unused"], "count", n=overall["layers"])


def _row_kwargs(ctx: Ctx) -> dict:
    return {"run_id": ctx.run_id, "tier": ctx.tier, "model": ctx.model, "arm": ctx.arm,
            "precision": ctx.precision, "source": ctx.log_path, "draw": ctx.draw}


def bare_loop_step_s(model, opt, xs, cuda: bool) -> float:
    """The same steps with no per-step instrumentation: one sync, one clock around the whole loop."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for x in xs:
        train_step(model, opt, x)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / len(xs)


ENV_PREFIXES = ("UNSLOTH", "E4B", "CUDA_VISIBLE", "OFFLOAD", "SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURMD_NODENAME")


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--tier", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="train.jsonl")
    ap.add_argument("--arm", required=True)
    ap.add_argument("--draw", type=int, required=True)
    ap.add_argument("--out", required=True, help="metrics.csv of this draw")
    ap.add_argument("--log", required=True)
    a = ap.parse_args(argv)
    log = logger("bench", a.log)
    cfg, tier = cfgmod.load(a.config), read_json(a.tier)
    arm = arm_registry.get(a.arm)
    ctx = Ctx(cfg["run"], tier["tier"], cfg["model"]["name"], arm.name, arm.precision, a.draw, a.log)
    started = datetime.now(timezone.utc).isoformat()
    cuda = tier.get("gpu") is not None
    reason = unavailable(arm, tier["plan"], cuda, a.model)
    if reason:
        log.info("skipped: %s", reason)
        ctx.add("step_s", status="skipped", reason=reason)
    else:
        try:
            with watched(cfg["arm_timeout_s"], log) as progress:
                run(ctx, arm, cfg, tier, a.model, a.data, log, bare_loop=a.arm in cfg["bare_loop_arms"],
                    progress=progress)
        except arm_registry.ArmUnavailable as exc:  # the arm itself found it cannot run here: say why
            log.info("skipped at load: %s", exc)
            ctx.add("step_s", status="skipped", reason=str(exc)[:600])
        except Exception as exc:  # OOM or crash: a failed row with the error, and the workflow goes on
            log.error("failed: %s\n%s", exc, traceback.format_exc())
            kind = "OOM" if "out of memory" in str(exc).lower() else type(exc).__name__
            reason = f"{kind}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            # rows measured before the failure stay (memory after load is telling when a step OOMs)
            timed = any(r.metric == "step_s" for r in ctx.rows)
            ctx.add("error" if timed else "step_s", status="failed", reason=reason)
    for r in ctx.rows:
        log_row(log, r)
    write_json(Path(a.out).parent / "env.json", {"arm": arm.name, "draw": a.draw, **environment(started, tier)})
    write_rows(a.out, ctx.rows)  # last: its existence marks the draw complete


if __name__ == "__main__":
    main()
