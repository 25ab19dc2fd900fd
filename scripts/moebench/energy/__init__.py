"""What a token costs in joules.

`EnergyMeter` wraps the timed window of a benchmark. It reads a cumulative energy counter at start and stop
(NVML `nvmlDeviceGetTotalEnergyConsumption` for a GPU, RAPL `energy_uj` for a CPU package) and samples power
in a background thread for a trace, the mean and the peak. Where the GPU has no energy counter the joules are
the integral of the sampled power, and the result says so in `method`. Where nothing can be read the result
is `unavailable` with the reason: the rows then carry no value, never a zero.

Caveats a reader should know: NVML and RAPL count the whole device (other processes included), so the meter
is only meaningful on a dedicated GPU/CPU; `idle_baseline` measures what the device draws doing nothing in
the same job so the `_net` rows can subtract it.
"""
from __future__ import annotations

import csv
import glob
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .metrics import Row

RAPL_ROOT = "/sys/class/powercap"
J_PER_KWH = 3.6e6


class EnergyUnavailable(RuntimeError):
    """No energy source can be read here (no GPU/NVML, RAPL absent or not readable)."""


class CounterUnsupported(RuntimeError):
    """The device has no cumulative energy counter: fall back to integrating sampled power."""


# ---------------------------------------------------------------- sources: one cumulative counter + power
class NvmlSource:
    """One GPU through NVML. `nvml` is the pynvml module or a fake with the same four functions."""

    name = "nvml"

    def __init__(self, index: int = 0, nvml=None):
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as e:  # nvidia-ml-py missing
                raise EnergyUnavailable(f"pynvml not importable ({e})") from e
        self.nvml = nvml
        try:
            nvml.nvmlInit()
            self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except Exception as e:  # NVMLError_LibraryNotFound / DriverNotLoaded on a host with no GPU
            raise EnergyUnavailable(f"NVML cannot open GPU {index}: {e}") from e
        self.device = f"gpu{index}"

    def energy_j(self) -> float:
        try:
            return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1e3  # mJ since driver load
        except Exception as e:
            if _is_not_supported(self.nvml, e):
                raise CounterUnsupported(str(e)) from e
            raise

    def power_w(self) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1e3  # mW, averaged by the driver

    def state(self) -> dict:
        """Clocks, power limit, temperature and throttle reasons now: the conditions a window ran under (a
        throttled or hot card makes a slower, cheaper-per-second step). A value NVML refuses is None."""
        n, h = self.nvml, self.handle

        def read(fn, scale=1.0):
            try:
                return fn() / scale
            except Exception:
                return None

        reasons = getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            getattr(n, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        mask = read(lambda: reasons(h)) if reasons else None
        return {"sm_clock_mhz": read(lambda: n.nvmlDeviceGetClockInfo(h, NVML_CLOCK_SM)),
                "mem_clock_mhz": read(lambda: n.nvmlDeviceGetClockInfo(h, NVML_CLOCK_MEM)),
                "power_limit_w": read(lambda: n.nvmlDeviceGetEnforcedPowerLimit(h), 1e3),
                "temp_c": read(lambda: n.nvmlDeviceGetTemperature(h, NVML_TEMPERATURE_GPU)),
                "throttle": None if mask is None else throttle_names(int(mask))}


# NVML's enum values (nvml.h), so a fake NVML needs no constants
NVML_CLOCK_SM, NVML_CLOCK_MEM, NVML_TEMPERATURE_GPU = 1, 2, 0
THROTTLE_BITS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
                 0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
                 0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting", 0x200: "board_limit",
                 0x400: "reliability"}


def throttle_names(mask: int) -> str:
    """NVML's clock-event (throttle) bitmask as names joined by '|' ('none' for 0, unknown bits in hex)."""
    names = [name for bit, name in THROTTLE_BITS.items() if mask & bit]
    rest = mask & ~sum(THROTTLE_BITS)
    return "|".join(names + ([hex(rest)] if rest else [])) or "none"


def _is_not_supported(nvml, exc: Exception) -> bool:
    cls = getattr(nvml, "NVMLError_NotSupported", None)
    return (cls is not None and isinstance(exc, cls)) or type(exc).__name__ == "NVMLError_NotSupported"


class RaplSource:
    """CPU packages through Linux powercap. The raw counters wrap at max_energy_range_uj, so we keep a running
    unwrapped total; the sampler reads often enough (many Hz) that at most one wrap happens between reads."""

    name = "rapl"

    def __init__(self, root: str = RAPL_ROOT):
        self.zones = _rapl_zones(root)
        if not self.zones:
            raise EnergyUnavailable(f"no readable RAPL counter under {root}")
        self.device = "cpu:" + ",".join(os.path.basename(z) for z in self.zones)
        self._lock = threading.Lock()  # sampler thread and main thread both read the counter
        self._last = [self._raw(z) for z in self.zones]
        self._total_uj = 0.0
        self._prev_power: tuple[float, float] | None = None

    @staticmethod
    def _raw(zone: str) -> int:
        return int(Path(zone, "energy_uj").read_text())

    def energy_j(self) -> float:
        with self._lock:
            for i, z in enumerate(self.zones):
                now, rng = self._raw(z), self._range(z)
                self._total_uj += rapl_delta_uj(self._last[i], now, rng)
                self._last[i] = now
            return self._total_uj / 1e6

    def _range(self, zone: str) -> int:
        return int(Path(zone, "max_energy_range_uj").read_text())

    def power_w(self) -> float | None:
        # RAPL has no power register: differentiate the counter between consecutive samples
        t, j = time.monotonic(), self.energy_j()
        prev, self._prev_power = self._prev_power, (t, j)
        if prev is None or t <= prev[0]:
            return None
        return (j - prev[1]) / (t - prev[0])


def rapl_delta_uj(start: int, end: int, max_range: int) -> int:
    """Counter difference with one wrap-around allowed (the counter restarts at 0 after max_range)."""
    return end - start if end >= start else end + max_range - start


def _rapl_zones(root: str) -> list[str]:
    """Top-level package zones only (intel-rapl:N, not intel-rapl:N:M): sub-zones are inside the package
    figure and would be counted twice."""
    zones = []
    for z in sorted(glob.glob(os.path.join(root, "intel-rapl:*"))):
        if os.path.basename(z).count(":") != 1:
            continue
        try:
            int(Path(z, "energy_uj").read_text())  # root-only since 2020 (CVE-2020-8694)
            int(Path(z, "max_energy_range_uj").read_text())
            zones.append(z)
        except (OSError, ValueError):
            continue
    return zones


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


# ---------------------------------------------------------------- rows + trace
def energy_rows(result: EnergyResult, idle: EnergyResult | None, tokens: int, **row_kwargs) -> list[Row]:
    """J/token and friends, gross and net of idle. `row_kwargs` fills run_id, tier, model, arm, precision,
    source, draw, n. A number that cannot be computed is an `unavailable` row with the reason."""
    kw = dict(row_kwargs, stage="energy")
    rows: list[Row] = []

    def put(metric, unit, value, why):
        if why:
            rows.append(Row(metric=metric, unit=unit, status="unavailable", reason=why, **kw))
        else:
            rows.append(Row(metric=metric, unit=unit, value=float(value), **kw))

    gross_why = _why_not(result, tokens)
    idle_w, idle_why = _idle_w(idle)
    j = result.joules if not gross_why else None
    net_j = j - idle_w * result.seconds if j is not None and idle_w is not None else None
    net_why = gross_why or idle_why or ("run drew no more than idle" if net_j is not None and net_j <= 0 else "")

    put("energy_j", "J", j, gross_why)
    put("j_per_token", "J/token", j / tokens if j else None, gross_why)
    put("j_per_token_net", "J/token", net_j / tokens if not net_why else None, net_why)
    put("tokens_per_kj", "tokens/kJ", tokens / (j / 1e3) if j else None, gross_why)
    put("tokens_per_kj_net", "tokens/kJ", tokens / (net_j / 1e3) if not net_why else None, net_why)
    put("kwh_per_mtok", "kWh/Mtok", j / tokens * 1e6 / J_PER_KWH if j else None, gross_why)
    put("kwh_per_mtok_net", "kWh/Mtok", net_j / tokens * 1e6 / J_PER_KWH if not net_why else None, net_why)
    put("mean_w", "W", result.mean_w, result.reason if result.status != "measured" else "")
    peak_why = result.reason if result.status != "measured" else ("" if result.peak_w is not None
                                                                  else "no power samples")
    put("peak_w", "W", result.peak_w, peak_why)
    put("idle_w", "W", idle_w, idle_why)
    if result.status == "measured":
        rows.append(Row(metric="energy_method", value=result.method, **kw))  # counter vs integrated samples
        rows.append(Row(metric="energy_window_s", value=float(result.seconds), unit="s", **kw))
        rows.append(Row(metric="power_samples", value=float(len(result.trace)), unit="count", **kw))
    if idle is not None and idle.status == "measured" and idle.settle_s is not None:
        rows.append(Row(metric="idle_settle_s", value=float(idle.settle_s), unit="s", reason=idle.settle_note, **kw))
    rows += state_rows("gpu", "_start", result.state_start, kw) + state_rows("gpu", "_end", result.state_end, kw)
    if idle is not None:
        rows += state_rows("idle_gpu", "", idle.state_start, kw)
    return rows


STATE_UNITS = {"sm_clock_mhz": "MHz", "mem_clock_mhz": "MHz", "power_limit_w": "W", "temp_c": "C", "throttle": ""}


def state_rows(prefix: str, suffix: str, state: dict, kw: dict) -> list[Row]:
    """One row per NVML reading of a window's start or end, e.g. gpu_sm_clock_mhz_start; one NVML refused is
    unavailable, never a zero."""
    rows = []
    for key, unit in STATE_UNITS.items():
        if key not in state:
            continue
        v, metric = state[key], f"{prefix}_{key}{suffix}"
        if v is None:
            rows.append(Row(metric=metric, unit=unit, status="unavailable", reason="NVML did not report it", **kw))
        else:
            rows.append(Row(metric=metric, unit=unit, value=v if isinstance(v, str) else float(v), **kw))
    return rows


def _idle_w(idle: EnergyResult | None) -> tuple[float | None, str]:
    if idle is None:
        return None, "no idle baseline"
    if idle.status != "measured" or idle.mean_w is None:
        return None, f"idle baseline unavailable: {idle.reason or 'no energy'}"
    return idle.mean_w, ""


def _why_not(result: EnergyResult, tokens: int) -> str:
    if result.status != "measured":
        return result.reason or "energy not measured"
    if not tokens or tokens <= 0:
        return "no tokens processed in the window"
    if result.joules is None or result.joules <= 0:
        return f"energy counter did not advance ({result.joules} J over {result.seconds:.3g} s)"
    return ""


def write_trace(path: str | os.PathLike, result: EnergyResult) -> Path:
    """The power trace as a small CSV (t_s, watts); written atomically like the metrics tables."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["t_s", "watts"])
        w.writerows((f"{t:.4f}", f"{p:.3f}") for t, p in result.trace)
    os.replace(tmp, path)
    return path


class ZeusWindow:
    """Zeus's GPU energy monitor over the same window as an EnergyMeter: an independent implementation (its own
    NVML reads and arithmetic) to compare with ours. Optional: without zeus, or without a GPU, `result` says
    why, and the wrapped work runs all the same."""

    def __init__(self, index: int = 0):
        self.index, self.mon = index, None
        self.result: dict = {"status": "unavailable", "reason": "window not run"}

    def __enter__(self):
        try:
            from zeus.monitor import ZeusMonitor

            self.mon = ZeusMonitor(gpu_indices=[self.index], cpu_indices=[])  # GPU only, as ours
            self.mon.begin_window("moebench")
        except Exception as e:  # not installed, no GPU, NVML refused
            self.mon, self.result = None, {"status": "unavailable", "reason": f"zeus: {type(e).__name__}: {e}"[:300]}
        return self

    def __exit__(self, *exc):
        if self.mon is not None:
            try:
                m = self.mon.end_window("moebench")
                self.result = {"status": "measured", "joules": float(m.total_energy), "seconds": float(m.time)}
            except Exception as e:
                self.result = {"status": "unavailable", "reason": f"zeus end_window: {e}"[:300]}
        return False


def zeus_rows(ours: EnergyResult, zeus: dict, tokens: int, **row_kwargs) -> list[Row]:
    """Zeus's joules for the window and its relative difference from ours ((zeus - ours) / ours)."""
    kw = dict(row_kwargs, stage="energy")
    if zeus.get("status") != "measured":
        return [Row(metric="energy_j_zeus", unit="J", status="unavailable", reason=zeus.get("reason", ""), **kw)]
    rows = [Row(metric="energy_j_zeus", unit="J", value=zeus["joules"], **kw),
            Row(metric="j_per_token_zeus", unit="J/token", value=zeus["joules"] / tokens, **kw)]
    if ours.status == "measured" and ours.joules:
        rows.append(Row(metric="zeus_vs_ours_rel_diff", unit="fraction",
                        value=(zeus["joules"] - ours.joules) / ours.joules, **kw))
    return rows
