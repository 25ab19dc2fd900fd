"""What a token costs in joules.

`EnergyMeter` wraps the timed window of a benchmark. It reads a cumulative energy counter at start and stop
(NVML `nvmlDeviceGetTotalEnergyConsumption` for a GPU, RAPL `energy_uj` for a CPU package) and samples power
in a background thread for a trace, the mean and the peak. Where the GPU has no energy counter the joules are
the integral of the sampled power, and the result says so in `method`. Where nothing can be read the result
is `unavailable` with the reason: the rows then carry no value, never a zero.

Caveats a reader should know: NVML and RAPL count the whole device (other processes included), so the meter
is only meaningful on a dedicated GPU/CPU; `idle_baseline` measures what the device draws doing nothing in
the same job so the `_net` rows can subtract it.

The meter is here; the devices it reads are in `sources` (NVML, RAPL), what a window becomes in `rows` (J/token
rows, the power trace, Zeus's reading of the same window).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

# the sources and the rows live beside the meter; every name stays importable as moebench.energy.X
from .rows import (J_PER_KWH, STATE_UNITS, ZeusWindow, _idle_w, _why_not, energy_rows,  # noqa: F401
                   state_rows, write_trace, zeus_rows)
from .sources import (NVML_CLOCK_MEM, NVML_CLOCK_SM, NVML_TEMPERATURE_GPU, RAPL_ROOT,  # noqa: F401
                      THROTTLE_BITS, CounterUnsupported, EnergyUnavailable, NvmlSource, RaplSource,
                      _is_not_supported, _rapl_zones, rapl_delta_uj, throttle_names)


def _cuda_present() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def open_source(backend: str = "auto", index: int = 0, nvml=None, rapl_root: str = RAPL_ROOT):
    """The source for `backend`; "auto" is NVML when a GPU is there, else RAPL. Raises EnergyUnavailable
    naming every reason tried."""
    if backend not in ("auto", "nvml", "rapl"):
        raise ValueError(f"unknown energy backend {backend!r} (auto, nvml, rapl)")
    reasons = []
    if backend == "nvml" or (backend == "auto" and (nvml is not None or _cuda_present())):
        try:
            return NvmlSource(index, nvml)
        except EnergyUnavailable as e:
            if backend == "nvml":
                raise
            reasons.append(str(e))
    elif backend == "auto":
        reasons.append("no CUDA GPU")
    try:
        return RaplSource(rapl_root)
    except EnergyUnavailable as e:
        raise EnergyUnavailable("; ".join(reasons + [str(e)])) from e


# ---------------------------------------------------------------- result + meter
@dataclass
class EnergyResult:
    status: str  # measured / unavailable
    backend: str = ""
    device: str = ""
    method: str = ""  # how the joules were obtained
    reason: str = ""
    joules: float | None = None
    seconds: float | None = None
    peak_w: float | None = None
    trace: list[tuple[float, float]] = field(default_factory=list)  # (t_s, watts)
    state_start: dict = field(default_factory=dict)  # NVML clocks/limit/temperature/throttle (GPU only)
    state_end: dict = field(default_factory=dict)
    settle_s: float | None = None  # idle baseline: seconds waited for power to settle first
    settle_note: str = ""  # idle baseline: why it measured before power settled ("" when settled)

    @property
    def mean_w(self) -> float | None:
        """Energy over time, not the mean of samples: the counter sees every joule, samples can miss spikes."""
        if self.joules is None or not self.seconds:
            return None
        return self.joules / self.seconds


class PowerSampler:
    """Background thread calling `read()` (W or None) every 1/hz s until stop()."""

    def __init__(self, read: Callable[[], float | None], hz: float = 15.0, clock=time.monotonic):
        self.read, self.period, self.clock = read, 1.0 / hz, clock
        self.samples: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moebench-power", daemon=True)

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._thread.start()

    def sample(self) -> None:
        try:
            w = self.read()
        except Exception as e:  # keep sampling: one failed read must not kill the trace
            self.errors.append(str(e))
            return
        if w is not None:
            self.samples.append((self.clock() - self.t0, float(w)))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.period)  # wakes at once on stop()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("power sampler thread did not stop")

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


def integrate_w(trace: list[tuple[float, float]]) -> float | None:
    """Trapezoid rule over (t_s, W) samples, in joules; None with fewer than two samples."""
    if len(trace) < 2:
        return None
    return sum((t1 - t0) * (w0 + w1) / 2 for (t0, w0), (t1, w1) in zip(trace, trace[1:]))


class EnergyMeter:
    """`with EnergyMeter() as m: work()` then `m.result`. Never raises for a missing source: the result is
    `unavailable` with the reason, so a benchmark runs the same on a laptop and on a GPU node."""

    def __init__(self, backend: str = "auto", index: int = 0, nvml=None, source=None, hz: float = 15.0,
                 rapl_root: str = RAPL_ROOT, clock=time.monotonic):
        self.backend, self.index, self.nvml, self.hz = backend, index, nvml, hz
        self.rapl_root, self.clock = rapl_root, clock
        self.source, self.result = source, None
        self._sampler: PowerSampler | None = None

    def __enter__(self):
        try:
            if self.source is None:
                self.source = open_source(self.backend, self.index, self.nvml, self.rapl_root)
        except EnergyUnavailable as e:
            self._unavailable = str(e)
            return self
        self._unavailable = ""
        self._counter_error = ""
        self._state0 = _state(self.source)  # before the counter: the joules and the seconds span the same reads
        try:
            self._e0 = self.source.energy_j()
        except CounterUnsupported as e:
            self._e0, self._counter_error = None, str(e)
        self._t0 = self.clock()
        self._sampler = PowerSampler(self.source.power_w, self.hz, self.clock)
        self._sampler.start(self._t0)
        return self

    @property
    def samples(self) -> int | None:
        """Power samples taken so far in this window (None when nothing is measured): the window's floor."""
        return len(self._sampler.samples) if self._sampler is not None else None

    def __exit__(self, *exc):
        if self._unavailable:
            self.result = EnergyResult("unavailable", self.backend, reason=self._unavailable)
            return False
        self._sampler.stop()
        self._sampler.sample()  # a last point at the very end of the window
        state_end = _state(self.source)
        self.result = self._finish(self._sampler.samples)
        self.result.state_start, self.result.state_end = self._state0, state_end
        return False

    def _finish(self, trace: list[tuple[float, float]]) -> EnergyResult:
        src = self.source
        e1 = src.energy_j() if self._e0 is not None else None
        seconds = self.clock() - self._t0  # right after the last counter read, as _t0 right after the first
        peak = max((w for _, w in trace), default=None)
        base = dict(backend=src.name, device=src.device, seconds=seconds, peak_w=peak, trace=list(trace))
        if e1 is not None:
            return EnergyResult("measured", method=f"{src.name} energy counter", joules=e1 - self._e0, **base)
        joules = integrate_w(trace)
        if joules is None:
            return EnergyResult("unavailable", reason=f"no energy counter ({self._counter_error}) and fewer "
                                f"than two power samples", **base)
        return EnergyResult("measured", joules=joules, method=f"integrated sampled power at {self.hz:g} Hz "
                            f"(energy counter not supported: {self._counter_error})", **base)


def _state(source) -> dict:
    read = getattr(source, "state", None)
    return read() if read else {}


def settle(source, tol: float = 0.05, max_s: float = 30.0, sleep=time.sleep, clock=time.monotonic,
           period: float = 1.0, hz: float = 10.0) -> tuple[bool, float, list[float]]:
    """Wait until two successive `period`-second mean powers differ by less than `tol` (a fraction of the
    latter), or `max_s` has passed. A card that just finished other work (or was just opened) draws more for a
    while, and an idle baseline read then is too high. Returns (settled, seconds waited, the means)."""
    t0, means = clock(), []
    while True:
        ws = []
        for _ in range(max(1, round(period * hz))):
            w = source.power_w()
            if w is not None:
                ws.append(w)
            sleep(1.0 / hz)
        means.append(sum(ws) / len(ws) if ws else None)
        a, b = means[-2:] if len(means) > 1 else (None, None)
        if a and b and abs(b - a) / b < tol:
            return True, clock() - t0, means
        if clock() - t0 >= max_s:
            return False, clock() - t0, means


def idle_baseline(seconds: float = 10.0, sleep=time.sleep, settle_tol: float = 0.05, settle_max_s: float = 0.0,
                  **meter_kwargs) -> EnergyResult:
    """What the device draws with nothing running, measured in the same job with the same meter: after power
    has settled (`settle`, up to `settle_max_s`; 0 skips it). Called before the arm's process creates a CUDA
    context (with backend "nvml" nothing here touches CUDA): a context alone draws tens of watts more, and
    arms that create theirs at import would otherwise get a higher baseline than the others."""
    kw = dict(meter_kwargs)
    settled, waited, means, note = True, 0.0, [], ""
    if settle_max_s > 0 and kw.get("source") is None:
        try:
            kw["source"] = open_source(kw.get("backend", "auto"), kw.get("index", 0), kw.get("nvml"),
                                       kw.get("rapl_root", RAPL_ROOT))
        except EnergyUnavailable as e:
            return EnergyResult("unavailable", kw.get("backend", "auto"), reason=str(e))
    if settle_max_s > 0:
        settled, waited, means = settle(kw["source"], settle_tol, settle_max_s, sleep=sleep,
                                        clock=kw.get("clock", time.monotonic))
        if not settled:
            last = ", ".join("?" if m is None else f"{m:.1f}" for m in means[-3:])
            note = f"power not settled within {settle_max_s:g} s (last 1 s means {last} W, tol {settle_tol:.0%})"
    with EnergyMeter(**kw) as m:
        sleep(seconds)
    m.result.settle_s, m.result.settle_note = (waited if settle_max_s > 0 else None), note
    return m.result
