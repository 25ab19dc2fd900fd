"""How a row names the setting it was measured at, shared by the stage that writes such rows (sweep) and the one
that reads them (recipe).

Rows have no batch/sequence/mode columns. A bench or offload row was measured at its tier plan's shape; a sweep
row carries its shape (and memory cap, if any) in the metric name, as offload's capped rows already do:
`tokens_per_s@1x8192` is tokens/s at batch 1 x sequence 8192, `fits@1x8192@cap24` the same under a 24 GiB cap.
"""
from __future__ import annotations

import re

_SHAPED = re.compile(r"^(?P<metric>[a-z0-9_]+)@(?P<batch>\d+)x(?P<seq>\d+)(?:@cap(?P<cap>[0-9.]+))?$")


def shape_metric(metric: str, batch: int, seq: int, cap_gb: float | None = None) -> str:
    return f"{metric}@{int(batch)}x{int(seq)}" + (f"@cap{cap_gb:g}" if cap_gb is not None else "")


def parse_shape_metric(name: str) -> tuple[str, int, int, float | None] | None:
    """(metric, batch, seq, cap GiB or None) of a shaped metric name, or None for a plain one."""
    m = _SHAPED.match(name)
    if not m:
        return None
    return m["metric"], int(m["batch"]), int(m["seq"]), float(m["cap"]) if m["cap"] else None


# A routing A/B window's rows (stage routing_ab) carry their window and router set in the metric name:
# `w3_raw_step_s` is the median step time of window 3, run with the raw routers.
_WINDOWED = re.compile(r"^w(?P<window>\d+)_(?P<routers>raw|calibrated)_(?P<metric>[a-z0-9_]+)$")


def window_metric(metric: str, window: int, routers: str) -> str:
    return f"w{int(window)}_{routers}_{metric}"


def parse_window_metric(name: str) -> tuple[str, int, str] | None:
    """(metric, window, router set) of a routing A/B window's metric name, or None for any other."""
    m = _WINDOWED.match(name)
    return (m["metric"], int(m["window"]), m["routers"]) if m else None


def is_capped(name: str) -> bool:
    """A measurement under a per-process memory cap (offload's `x@cap24[...]`, sweep's `x@1x8192@cap24`)."""
    return "@cap" in name


def mode_of(gradient_checkpointing, arm: str = "") -> str:
    """The checkpointing mode a plan's `gradient_checkpointing` value means for `arm` (offload's mode names):
    "unsloth" (offloaded activations) is Unsloth's own; the other stacks read any true value as HF's plain
    non-reentrant checkpointing."""
    if gradient_checkpointing in (False, None, "false", "none", ""):
        return "none"
    if gradient_checkpointing in (True, "true", "plain") or not arm.startswith("unsloth"):
        return "plain"
    return str(gradient_checkpointing)
