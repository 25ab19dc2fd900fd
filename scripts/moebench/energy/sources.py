"""Where the joules come from: one cumulative energy counter plus a power reading per device. NVML for a GPU
(counter in mJ since driver load, power averaged by the driver, and the clocks/limit/temperature/throttle state a
window ran under); Linux powercap RAPL for CPU packages (a wrapping microjoule counter, power by differentiating
it). A source that cannot be opened raises EnergyUnavailable with the reason.
"""
from __future__ import annotations

import glob
import os
import threading
import time
from pathlib import Path

RAPL_ROOT = "/sys/class/powercap"


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
