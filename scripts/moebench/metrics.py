"""The one tidy metrics schema: every stage writes these rows, every plot and the provenance read them.

A `skipped`/`failed`/`unavailable` row carries no value: plots draw it as a labelled gap, never a zero. A
`degraded` row keeps the value measured on a fallback path a library announced (the matched line is its reason):
it is shown as such and never carries a verdict.
"""
from __future__ import annotations

import csv
import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable

STATUSES = ("measured", "degraded", "skipped", "failed", "unavailable")
VALUED = ("measured", "degraded")  # statuses whose rows carry a number


@dataclass
class Row:
    run_id: str
    tier: str
    model: str
    arm: str  # canonical arm id, e.g. hf_bf16, unsloth_4bit
    precision: str  # bf16 / nf4
    stage: str  # bench / offload / energy / validate / sweep
    metric: str  # step_s, tokens_per_s, peak_alloc_gb, ...
    value: float | str | None = None
    unit: str = ""
    n: int | None = None
    spread: float | None = None  # interquartile range over the n repeats, same unit as value
    status: str = "measured"
    reason: str = ""
    source: str = ""  # path of the log the value came from
    draw: int | None = None  # fresh-process repeat index (None for aggregates)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")
        if self.status != "measured" and not self.reason:
            raise ValueError(f"a {self.status} row needs a reason ({self.arm}/{self.metric})")
        if self.status not in VALUED:
            self.value, self.spread = None, None
        elif self.value is None or (isinstance(self.value, float) and not math.isfinite(self.value)):
            raise ValueError(f"a measured row needs a finite value ({self.arm}/{self.metric}: {self.value!r})")


COLUMNS = [f.name for f in fields(Row)]
NUMERIC = {"value", "spread"}
INTS = {"n", "draw"}


def _parse(col: str, text: str):
    if text == "":
        return None
    if col in INTS:
        return int(float(text))
    if col in NUMERIC:
        try:
            return float(text)
        except ValueError:
            return text  # a categorical measurement (e.g. backend name)
    return text


def write_rows(path: str | os.PathLike, rows: Iterable[Row]) -> Path:
    """Write atomically: a killed job never leaves a half table that looks complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            d = asdict(r)
            w.writerow({k: ("" if v is None else v) for k, v in d.items()})
    os.replace(tmp, path)
    return path


def read_rows(path: str | os.PathLike) -> list[Row]:
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = set(COLUMNS) - set(reader.fieldnames or [])
        if missing - {"draw"}:
            raise ValueError(f"{path}: not a moebench metrics table (missing columns {sorted(missing)})")
        return [Row(**{c: _parse(c, rec.get(c, "")) for c in COLUMNS}) for rec in reader]


def read_many(paths: Iterable[str | os.PathLike]) -> list[Row]:
    out: list[Row] = []
    for p in paths:
        out.extend(read_rows(p))
    return out


def to_frame(rows: Iterable[Row]):
    import pandas as pd

    return pd.DataFrame([asdict(r) for r in rows], columns=COLUMNS)


# ---- rows in logs: each measured number is also a line of its run.log, so the audit can re-derive it -----
LOG_TAG = "MOEBENCH_ROW"


def log_row(log, row: Row) -> None:
    import json

    log.info("%s %s", LOG_TAG, json.dumps(asdict(row), sort_keys=True))


def parse_log_rows(path: str | os.PathLike) -> list[Row]:
    import json

    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        if LOG_TAG + " " in line:
            out.append(Row(**json.loads(line.split(LOG_TAG + " ", 1)[1])))
    return out
