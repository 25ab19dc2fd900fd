"""Provenance ids: the one function that names a number, shared by provenance.json, the report's captions, the
claims ledger and the README renderer (a stage may not import another, so the id lives here)."""
from __future__ import annotations


def number_id(run: str, stage: str, arm: str, draw, metric: str) -> str:
    """Stable id of a number: `<run>/<stage>/<arm>/d<draw>/<metric>`, `all` in place of `d<draw>` for a number
    over all draws (an aggregate row). The same run/stage/arm/draw/metric always gets the same id."""
    return f"{run}/{stage}/{arm}/{'all' if draw in (None, '') else f'd{int(draw)}'}/{metric}"


def row_id(row, run: str | None = None) -> str:
    """A metrics Row's id; `run` names the run when the row's own run_id is empty."""
    return number_id(row.run_id or run, row.stage, row.arm, row.draw, row.metric)
