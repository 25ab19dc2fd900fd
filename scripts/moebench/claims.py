"""The claims ledger: each stack's public claims (config/claims.yaml) judged against the measured rows of a run.

A claim `holds`, `does not hold` (with the measured value) or is `not testable here` (with why): the run does not
match the conditions the claim was made under (tier, model, GPU, a measured fact it presupposes), or a row it
needs was not measured. A claim is never judged outside its conditions. Per-draw rows enter as the median over
the run's draws; every verdict names the provenance ids (provenance.number_id) of the rows it rests on.

Writes results/<run>/claims.json (the authority), claims.md, and for the report claims.html + claims.caption.rst.
"""
from __future__ import annotations

import argparse
import html
import json
import statistics
import sys
from pathlib import Path

import yaml

from .io import atomic_write, logger, read_json, sha256_file, shorten, write_json
from .metrics import Row, read_rows
from .ids import number_id
from .report.tables import html_page, html_table, lit, rst_table

SCHEMA = "moebench.claims/1"
HOLDS, FAILS, UNTESTABLE = "holds", "does not hold", "not testable here"
GIB_PER_GB = 1e9 / 2**30
RUN_CONDITIONS = ("tier", "model", "model_scale", "gpu")
# conditions.settings: the training settings a claim names (a notebook's LoRA rank, batch, sequence length), read
# from the run's own config.yaml and tier.json plan; a run at other settings cannot test it.
SETTINGS = {"lora_r": ("config", "lora", "r"), "batch": ("plan", "batch"), "seq_len": ("plan", "seq_len"),
            "gradient_checkpointing": ("plan", "gradient_checkpointing")}


class ClaimsError(ValueError):
    """A malformed ledger entry: the message names the claim and the key."""


# ---- the ledger ------------------------------------------------------------------------------------------
def _operand(cid: str, where: str, op) -> dict:
    if not isinstance(op, dict) or not op.get("arm") or not op.get("metric"):
        raise ClaimsError(f"claim {cid}: {where} needs `arm` and `metric`, got {op!r}")
    return {"arm": op["arm"], "metric": op["metric"], "stage": op.get("stage", "bench")}


def check_claim(c: dict) -> dict:
    """Validate one entry and fill defaults (operand stage = bench; `about` turned into min/max)."""
    cid = c.get("id") or "(no id)"
    for key in ("id", "text", "source", "metric", "expect"):
        if not c.get(key):
            raise ClaimsError(f"claim {cid}: missing `{key}`")
    m, e = dict(c["metric"]), dict(c["expect"])
    if m.get("kind") == "ratio":
        m["numerator"] = _operand(cid, "metric.numerator", m.get("numerator"))
        m["denominator"] = _operand(cid, "metric.denominator", m.get("denominator"))
    elif m.get("kind") == "value":
        m["of"] = _operand(cid, "metric.of", m.get("of"))
    else:
        raise ClaimsError(f"claim {cid}: metric.kind must be `ratio` or `value`, got {m.get('kind')!r}")
    if "about" in e:
        tol = float(e.get("tolerance", 0.1))
        e.setdefault("min", e["about"] * (1 - tol))
        e.setdefault("max", e["about"] * (1 + tol))
    if e.get("min") is None and e.get("max") is None:
        raise ClaimsError(f"claim {cid}: expect needs `min`, `max` or `about`")
    if e.get("unit") not in (None, "GiB"):
        raise ClaimsError(f"claim {cid}: expect.unit may only be GiB, got {e['unit']!r}")
    cond = dict(c.get("conditions") or {})
    unknown = set(cond) - set(RUN_CONDITIONS) - {"rows", "memory_not_binding", "settings"}
    if unknown:
        raise ClaimsError(f"claim {cid}: unknown condition(s) {sorted(unknown)}")
    bad = sorted(set(cond.get("settings") or {}) - set(SETTINGS))
    if bad:
        raise ClaimsError(f"claim {cid}: conditions.settings knows {sorted(SETTINGS)}, not {bad}")
    cond["rows"] = [{**_operand(cid, "conditions.rows", r),
                     **{k: r[k] for k in ("equals", "min", "max") if k in r}} for r in cond.get("rows", [])]
    return {**c, "metric": m, "expect": e, "conditions": cond}


def load_ledger(path) -> list[dict]:
    doc = yaml.safe_load(Path(path).read_text()) or {}
    claims = [check_claim(c) for c in doc.get("claims") or []]
    ids = [c["id"] for c in claims]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ClaimsError(f"{path}: claim ids used twice: {dup}")
    return claims


# ---- the run ---------------------------------------------------------------------------------------------
def run_info(run_dir, rows: list[Row]) -> dict:
    """What the conditions are checked against: tier.json's tier, GPU and plan, and the rows' model."""
    d = Path(run_dir)
    tier = read_json(d / "tier.json") if (d / "tier.json").is_file() else None
    gpu = (tier or {}).get("gpu") or {}
    models = sorted({r.model for r in rows if r.model})
    cfg = yaml.safe_load((d / "config.yaml").read_text()) if (d / "config.yaml").is_file() else {}
    return {"run": d.name, "settings": run_settings(cfg or {}, (tier or {}).get("plan") or {}),
            "tier": (tier or {}).get("tier"), "gpu": gpu.get("name") or ("none" if tier else None),
            "gpu_memory_gb": gpu.get("memory_gb"), "model_scale": ((tier or {}).get("plan") or {}).get("model_scale"),
            "model": models[0] if len(models) == 1 else (", ".join(models) or None),
            "tier_json": tier is not None}


def run_settings(cfg: dict, plan: dict) -> dict:
    """The run's values of the SETTINGS keys (None where it does not say)."""
    out = {}
    for key, (src, *path) in SETTINGS.items():
        v = cfg if src == "config" else plan
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        out[key] = v
    return out


def _select(rows: list[Row], op: dict) -> list[Row]:
    return [r for r in rows if r.arm == op["arm"] and r.stage == op["stage"] and r.metric == op["metric"]]


def _name(op: dict) -> str:
    return f"{op['arm']} {op['stage']}/{op['metric']}"


def _id(r: Row, run: str) -> str:
    return number_id(r.run_id or run, r.stage, r.arm, r.draw, r.metric)


def operand(rows: list[Row], op: dict, run: str) -> dict:
    """Median over the measured draws of one arm/stage/metric, or why there is none."""
    mine = _select(rows, op)
    ids = [_id(r, run) for r in mine]
    vals = [r.value for r in mine if r.status == "measured"]
    if not mine:
        # An arm that did not run has only its step_s row(s), which carry the reason: say that, not "no rows".
        down = sorted((r for r in rows if r.arm == op["arm"] and r.status != "measured"),
                      key=lambda r: r.stage != op["stage"])
        if down:
            bad = down[0]
            return {"value": None, "ids": [_id(r, run) for r in down if r.stage == bad.stage],
                    "why": f"no {_name(op)} row: {op['arm']} {bad.stage} {bad.status}: {shorten(bad.reason)}"}
        return {"value": None, "ids": [], "why": f"no {_name(op)} rows in this run", "absent": True}
    if not vals:
        bad = next(r for r in mine if r.status != "measured")
        return {"value": None, "ids": ids, "why": f"{_name(op)} {bad.status}: {shorten(bad.reason)}"}
    if not all(isinstance(v, (int, float)) for v in vals):
        return {"value": None, "ids": ids, "why": f"{_name(op)} is not a number ({vals[0]!r})"}
    return {"value": statistics.median(vals), "ids": [i for i, r in zip(ids, mine) if r.status == "measured"],
            "n": len(vals), "unit": mine[0].unit, "why": ""}


def _fmt(v) -> str:
    return "—" if v is None else (f"{v:.4g}" if isinstance(v, (int, float)) else str(v))


def expect_text(e: dict) -> str:
    unit = f" {e['unit']}" if e.get("unit") else ""
    if e.get("min") is not None and e.get("max") is not None:
        return f"in [{_fmt(e['min'])}, {_fmt(e['max'])}]{unit}"
    return f">= {_fmt(e['min'])}{unit}" if e.get("min") is not None else f"<= {_fmt(e['max'])}{unit}"


# ---- judging ---------------------------------------------------------------------------------------------
def _run_mismatch(cond: dict, info: dict) -> str:
    """Why the run is not one the claim was made on ('' when it is)."""
    for key in RUN_CONDITIONS:
        want = cond.get(key)
        if not want:
            continue
        have, src = info.get(key), "metrics.csv" if key == "model" else "tier.json"
        if have is None:
            return f"the claim needs {key} in {want}; this run does not say its {key} ({src} absent or silent)"
        ok = any(w.lower() in have.lower() for w in want) if key == "gpu" else have in want
        if not ok:
            return f"the claim was made on {key} {' / '.join(map(str, want))}; this run's {key} is {have} ({src})"
    return _settings_mismatch(cond.get("settings") or {}, info.get("settings") or {})


def _settings_mismatch(want: dict, have: dict) -> str:
    """Why the run's settings are not the ones the claim names ('' when they are)."""
    off = [f"{k} {want[k]} (this run: {have.get(k)})" for k in sorted(want) if have.get(k) != want[k]]
    return f"the claim is made at {', '.join(off)}; its settings are the run's config and tier plan" if off else ""


def _row_conditions(cond: dict, rows: list[Row], run: str) -> tuple[str, list[str]]:
    """Measured facts the claim presupposes (e.g. the baseline ran grouped_mm; the 4-bit arm really is 4-bit)."""
    ids = []
    for rc in cond.get("rows", []):
        got = operand(rows, rc, run)
        ids += got["ids"]
        mine = [r.value for r in _select(rows, rc) if r.status == "measured"]
        if not mine:
            return f"condition on {_name(rc)} unchecked: {got['why'] or 'no measured row'}", ids
        if "equals" in rc and any(str(v) != str(rc["equals"]) for v in mine):
            return f"the claim presupposes {_name(rc)} = {rc['equals']}; measured {sorted(set(map(str, mine)))}", ids
        v = got["value"]
        if ("min" in rc or "max" in rc) and v is None:
            return f"condition on {_name(rc)} unchecked: {got['why']}", ids
        if ("min" in rc and v < rc["min"]) or ("max" in rc and v > rc["max"]):
            return (f"the claim presupposes {_name(rc)} {expect_text(rc)}; measured {_fmt(v)}"), ids
    return "", ids


def _memory_binding(cond: dict, arms: list[str], rows: list[Row], info: dict, run: str) -> tuple[str, list[str]]:
    """'When memory is not binding': each arm's peak reserved memory stays below a fraction of the card."""
    spec = cond.get("memory_not_binding")
    if not spec:
        return "", []
    frac = float(spec.get("max_fraction", 0.9)) if isinstance(spec, dict) else 0.9
    card = info.get("gpu_memory_gb")
    if not card:
        return "the claim holds only where memory is not binding; this run has no GPU memory to compare to", []
    ids = []
    for arm in arms:
        peaks = [r for r in rows if r.arm == arm and r.stage == "bench" and r.metric == "peak_reserved_gb"
                 and r.status == "measured"]
        ids += [_id(r, run) for r in peaks]
        if not peaks:
            return f"memory not binding unchecked: no measured {arm} bench/peak_reserved_gb", ids
        peak = max(r.value for r in peaks)
        if peak > frac * card:
            return (f"memory is binding: {arm} peak reserved {peak:.4g} GB > {frac:g} x {card:g} GB card; "
                    "the claim is about the unbound case"), ids
    return "", ids


def judge(claim: dict, rows: list[Row], info: dict) -> dict:
    """Pure: one claim (as check_claim returns it), the run's rows and run_info -> verdict, value, reason, ids."""
    run, m, e, cond = info.get("run", ""), claim["metric"], claim["expect"], claim["conditions"]
    rows = [r for r in rows if not r.run_id or not run or r.run_id == run]
    out = {"verdict": UNTESTABLE, "value": None, "reason": "", "provenance_ids": [], "expect": expect_text(e)}
    why = _run_mismatch(cond, info)
    if why:
        return {**out, "reason": why}
    ops = [m["numerator"], m["denominator"]] if m["kind"] == "ratio" else [m["of"]]
    got = [operand(rows, op, run) for op in ops]
    ids = [i for g in got for i in g["ids"]]
    missing = [g["why"] for g in got if g["value"] is None]
    if missing:
        hint = claim.get("when_absent") if any(g.get("absent") for g in got) else ""
        return {**out, "reason": "; ".join(missing) + (f" ({hint})" if hint else ""), "provenance_ids": ids}
    why, cids = _row_conditions(cond, rows, run)
    ids += [i for i in cids if i not in ids]
    if not why:
        why, mids = _memory_binding(cond, sorted({op["arm"] for op in ops}), rows, info, run)
        ids += [i for i in mids if i not in ids]
    if why:
        return {**out, "reason": why, "provenance_ids": ids}
    if m["kind"] == "ratio":
        if got[1]["value"] == 0:
            return {**out, "reason": f"{_name(ops[1])} is 0: no ratio", "provenance_ids": ids}
        value = got[0]["value"] / got[1]["value"]
        basis = " / ".join(f"{_name(op)} {_fmt(g['value'])} {g['unit']}".rstrip() for op, g in zip(ops, got))
    else:
        value = got[0]["value"]
        basis = f"{_name(ops[0])} {_fmt(value)} {got[0]['unit']}".rstrip()
    if e.get("unit") == "GiB":
        value *= GIB_PER_GB
        basis += f" = {_fmt(value)} GiB"
    lo, hi = e.get("min"), e.get("max")
    ok = (lo is None or value >= lo) and (hi is None or value <= hi)
    n = " and ".join(str(g["n"]) for g in got)
    reason = f"measured {_fmt(value)} ({basis}; medians over {n} draws); claim: {expect_text(e)}"
    return {**out, "verdict": HOLDS if ok else FAILS, "value": value, "reason": reason, "provenance_ids": ids}


def judge_run(claims: list[dict], rows: list[Row], info: dict) -> list[dict]:
    out = []
    for c in claims:
        v = judge(c, rows, info)
        out.append({"id": c["id"], "text": c["text"], "source": c["source"], "reading": c.get("reading", ""),
                    "conditions": {k: v for k, v in c["conditions"].items() if v}, **v})
    return out


# ---- rendering -------------------------------------------------------------------------------------------
def _md(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _source(s) -> str:
    if isinstance(s, dict):
        return f"{s.get('who', '')}: {s.get('where', '')}" + (f" <{s['url']}>" if s.get("url") else "")
    return str(s)


def render_md(doc: dict) -> str:
    counts = doc["counts"]
    lines = [f"# Claims ledger of run `{doc['run']}`", "",
             f"Each claim of `{doc['ledger']['path']}` judged against `results/{doc['run']}/metrics.csv` "
             f"(tier.json for the conditions): " + ", ".join(f"{n} {k}" for k, n in counts.items()) + ".", "",
             "| claim | verdict | measured | claim's range | why | provenance ids | source |", "|---" * 7 + "|"]
    for c in doc["claims"]:
        ids = "<br>".join(f"`{i}`" for i in c["provenance_ids"]) or "—"
        lines.append(f"| **{_md(c['id'])}**: {_md(c['text'])} | **{c['verdict']}** | {_fmt(c['value'])} | "
                     f"{_md(c['expect'])} | {_md(c['reason'])} | {ids} | {_md(_source(c['source']))} |")
    return "\n".join(lines) + "\n"


def render_html(doc: dict) -> str:
    esc = html.escape
    head = ["claim", "source", "verdict", "measured", "claim's range", "why", "provenance ids"]
    rows, classes = [], []
    for c in doc["claims"]:
        ids = "<br>".join(f"<code>{esc(i)}</code>" for i in c["provenance_ids"]) or "—"
        src = c["source"] if isinstance(c["source"], dict) else {"where": str(c["source"])}
        src_html = esc(f"{src.get('who', '')}: {src.get('where', '')}")
        if src.get("url"):
            src_html += f" <a href='{esc(src['url'])}'>{esc(src['url'])}</a>"
        rows.append([f"<b>{esc(c['id'])}</b><br>{esc(c['text'])}<br><i>{esc(c['reading'])}</i>", src_html,
                     f"<b>{esc(c['verdict'])}</b>", esc(_fmt(c["value"])), esc(c["expect"]), esc(c["reason"]), ids])
        classes.append(c["verdict"].replace(" ", "-"))
    body = (f"<p>{esc(', '.join(f'{n} {k}' for k, n in doc['counts'].items()))}. Ledger "
            f"<code>{esc(doc['ledger']['path'])}</code> (sha256 <code>{esc(doc['ledger']['sha256'][:16])}</code>); "
            "the ids are those of <code>provenance.json</code> and of the metrics table.</p>"
            + html_table(head, rows, classes, raw=True))
    return html_page(f"{doc['run']}: claims ledger", body)


def render_caption(doc: dict) -> str:
    """The same table as rst, for the report caption (verdicts and the ids they rest on)."""
    head = (f"Run ``{doc['run']}``: each claim of ``{doc['ledger']['path']}`` judged against this run's measured "
            "rows: **holds**, **does not hold** (with the measured value) or **not testable here** (the run does "
            "not match the claim's conditions, or a row it needs was not measured). Ratios and values are medians "
            "over draws. " + ", ".join(f"{n} {k}" for k, n in doc["counts"].items()) + ".\n\n")
    table = [[lit(c["id"]), f"**{c['verdict']}**", _fmt(c["value"]), lit(c["expect"]), lit(c["reason"]),
              " ".join(lit(i) for i in c["provenance_ids"]) or "—"] for c in doc["claims"]]
    return head + rst_table(["claim", "verdict", "measured", "claim's range", "why", "provenance ids"], table)


def build(ledger_path, run_dir) -> dict:
    d = Path(run_dir)
    rows = read_rows(d / "metrics.csv") if (d / "metrics.csv").is_file() else []
    info = run_info(d, rows)
    judged = judge_run(load_ledger(ledger_path), rows, info)
    counts = {k: sum(c["verdict"] == k for c in judged) for k in (HOLDS, FAILS, UNTESTABLE)}
    ledger = {"path": str(ledger_path), "sha256": sha256_file(ledger_path)}
    return {"schema": SCHEMA, "run": info["run"], "ledger": ledger, "run_info": info, "counts": counts,
            "claims": judged}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ledger", default="config/claims.yaml")
    ap.add_argument("--run-dir", required=True, help="results/<run> (metrics.csv, tier.json)")
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--out-md", required=True)
    ap.add_argument("--out-html", help="report page")
    ap.add_argument("--out-caption", help="rst table the report caption includes")
    ap.add_argument("--log")
    a = ap.parse_args(argv)
    log = logger("claims", a.log)
    try:
        doc = build(a.ledger, a.run_dir)
    except (ClaimsError, OSError, ValueError, yaml.YAMLError) as exc:
        log.error("claims not judged: %s", exc)
        return 2
    write_json(a.out_json, doc)
    atomic_write(a.out_md, render_md(doc))
    if a.out_html:
        atomic_write(a.out_html, render_html(doc))
    if a.out_caption:
        atomic_write(a.out_caption, render_caption(doc))
    for c in doc["claims"]:
        log.info("%s: %s — %s", c["id"], c["verdict"], c["reason"])
    log.info("%s: %s", a.out_json, json.dumps(doc["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
