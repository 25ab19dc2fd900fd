"""Aggregate a run: all rows into metrics.csv, the comparison table (CSV + Markdown) with speedups against the
baseline arms, and the verdict. Speedups are ratios of medians measured in the same run; where its draws span more
than one session (machine or lease), the table and the verdict say so."""
from __future__ import annotations

import argparse
import csv
import io
import re
import statistics
from dataclasses import replace
from datetime import datetime
from pathlib import Path

from . import config as cfgmod
from . import router_calibration
from .grid import parse_shape_metric, parse_window_metric
from .io import atomic_write, read_json, shorten, write_json
from .metrics import VALUED, Row, read_many, write_rows
from .verdict import Draw, beside, mark_superseded, overall_verdict, speed_verdict

COLUMNS = ["run_id", "tier", "model", "arm", "precision", "status", "reason", "draws", "step_s", "step_s_iqr",
           "draw_range_s", "tokens_per_s", "peak_alloc_gb", "mem_after_load_gb", "load_s", "expert_lora_params",
           "expert_4bit_fraction"]


def _valued(rows, metric):
    return [r for r in rows if r.metric == metric and r.status in VALUED]


def arm_summary(arm: str, rows: list[Row]) -> dict:
    """One line per arm: medians over draws (each draw's value is itself a median over timed steps); peak memory
    is the largest draw's. A line with any degraded draw is `degraded` and says which line betrayed it."""
    mine = [r for r in rows if r.arm == arm and r.stage == "bench"]
    steps = _valued(mine, "step_s")
    first = mine[0]
    out = {"run_id": first.run_id, "tier": first.tier, "model": first.model, "arm": arm, "precision": first.precision}
    if not steps:
        bad = next((r for r in mine if r.status != "measured"), first)
        return {**out, "status": bad.status, "reason": bad.reason, "draws": 0}
    med = lambda m: statistics.median(r.value for r in _valued(mine, m)) if _valued(mine, m) else None
    mx = lambda m: max((r.value for r in _valued(mine, m)), default=None)
    degraded = next((r for r in steps if r.status == "degraded"), None)
    flagged = [r for r in mine if r.metric == "spread_flag" and r.status in VALUED and r.value]
    return {**out, "status": "degraded" if degraded else "measured", "reason": degraded.reason if degraded else "",
            "draws": len(steps), "step_s": statistics.median(r.value for r in steps),
            "step_s_iqr": statistics.median(r.spread or 0.0 for r in steps),
            "draw_range_s": max(r.value for r in steps) - min(r.value for r in steps),
            "tokens_per_s": med("tokens_per_s"), "peak_alloc_gb": mx("peak_alloc_gb") or mx("peak_rss_gb"),
            "mem_after_load_gb": med("alloc_after_load_gb") or med("rss_after_load_gb"), "load_s": med("load_s"),
            "expert_lora_params": med("expert_lora_params"), "expert_4bit_fraction": med("expert_weights_4bit_fraction"),
            "spread_flagged": len(flagged)}


def compare(rows: list[Row], arms: list[str], baselines: list[str]) -> tuple[list[dict], list[Row]]:
    """Comparison lines, plus `compare` rows (speedups) so the provenance holds every derived number too. A ratio
    with a degraded side is itself degraded."""
    lines = [arm_summary(a, rows) for a in arms if any(r.arm == a and r.stage == "bench" for r in rows)]  # A/B-only runs: none
    by_arm = {l["arm"]: l for l in lines}
    derived = []
    for line in lines:
        for base in baselines:
            col = f"speedup_vs_{base}"
            b = by_arm.get(base)
            if line["status"] not in VALUED or not b or b["status"] not in VALUED:
                line[col] = None
                continue
            line[col] = b["step_s"] / line["step_s"]
            bad = next((l for l in (line, b) if l["status"] == "degraded"), None)
            derived.append(Row(line["run_id"], line["tier"], line["model"], line["arm"], line["precision"], "compare",
                               col, line[col], "x", line["draws"], None, "degraded" if bad else "measured",
                               f"{bad['arm']} degraded: {bad['reason']}" if bad else "", "comparison.csv"))
    return lines, derived


# ---- the draws the verdict rests on ----------------------------------------------------------------------------
TIMED_STEP = re.compile(r"timed step (\d+)(?:/\d+)?: ([0-9.eE+-]+) s")  # "i/n" in older logs


def step_times(draw_dir: Path) -> list[float]:
    """A draw's timed step times: steps.csv where the draw wrote one, else its run.log's per-step lines."""
    csv_path = draw_dir / "steps.csv"
    if csv_path.exists():
        with open(csv_path) as f:
            return [float(r["seconds"]) for r in csv.DictReader(f)]
    log = draw_dir / "run.log"
    return [float(m.group(2)) for m in TIMED_STEP.finditer(log.read_text())] if log.exists() else []


def console_degraded(rows: list[Row], draw_dirs: list[Path], cfg: dict, ab_dirs: list[Path] = ()) -> list[Row]:
    """Re-read each draw's (and each routing A/B process's) console for the fallback lines its arm declares: a
    process measured before moebench looked for them (committed runs) is degraded all the same. Rows are
    returned, not changed."""
    from .harness import arm_patterns, console_reason, degraded_matches, draw_console

    hits = {}
    consoles = [(("bench", d.parent.name, int(d.name.removeprefix("draw"))), draw_console(d)) for d in draw_dirs]
    consoles += [(("routing_ab", d.name, None), (d / "console.log").read_text(errors="replace"))
                 for d in ab_dirs if (d / "console.log").is_file()]
    for key, text in consoles:
        why = text and console_reason(degraded_matches(text, arm_patterns(cfg, key[1]), cfg.get("recompile_limit")))
        if why:
            hits[key] = why
    return [replace(r, status="degraded", reason=hits[(r.stage, r.arm, r.draw)])
            if r.status == "measured" and (r.stage, r.arm, r.draw) in hits else r for r in rows]


def read_draws(rows: list[Row], draw_dirs: list[Path]) -> dict[str, list[Draw]]:
    """arm -> its draws as the verdict sees them: status from the step_s row, step times, start time."""
    out: dict[str, list[Draw]] = {}
    for d in draw_dirs:
        arm, k = d.parent.name, int(d.name.removeprefix("draw"))
        mine = [r for r in rows if r.arm == arm and r.draw == k and r.stage == "bench"]
        step = next((r for r in mine if r.metric == "step_s"), None)
        if step is None:
            continue
        val = lambda m: next((r.value for r in mine if r.metric == m and r.status in VALUED), None)
        env = read_json(d / "env.json") if (d / "env.json").exists() else {}
        steps = step_times(d) if step.status in VALUED else []
        status, reason = step.status, step.reason
        if status in VALUED and not steps:
            status, reason = "failed", f"no per-step times in {d} (steps.csv or run.log)"
        out.setdefault(arm, []).append(Draw(arm, k, steps, status, reason, env.get("started", ""),
                                            val("expert_lora_params"), val("expert_weights_4bit_fraction")))
    return out


SESSION_GAP_S = 3600  # the draws of one invocation follow each other within minutes


def sessions(envs: list[dict]) -> list[dict]:
    """Group a run's draws (their env.json) into measuring sessions: a new one starts where the recorded machine
    changes (boot id and GPU) or more than an hour passes between draws (draws recorded before the machine id
    was). Ratios between arms of different sessions compare machines as well as stacks."""
    out: list[dict] = []
    for e in sorted(envs, key=lambda e: e["started"]):
        h = e.get("host") or {}
        key = (h["boot_id"], h.get("gpu_uuid")) if h.get("boot_id") else None
        start, end = datetime.fromisoformat(e["started"]), datetime.fromisoformat(e.get("ended", e["started"]))
        last = out[-1] if out else None
        same = last is not None and (start - last["_end"]).total_seconds() <= SESSION_GAP_S and \
            (key is None or last["_key"] is None or key == last["_key"])
        if not same:
            last = {"_key": key, "_end": end, "arms": [], "from": e["started"],
                    "hostname": h.get("hostname"), "gpu": (e.get("gpu") or {}).get("name")}
            out.append(last)
        last["_key"], last["_end"] = last["_key"] or key, max(last["_end"], end)
        if e["arm"] not in last["arms"]:
            last["arms"].append(e["arm"])
    return [{**{k: v for k, v in s.items() if not k.startswith("_")}, "to": s["_end"].isoformat()} for s in out]


def validation_note(gates: dict[str, dict]) -> str:
    """The Markdown lines on each validated arm's fine-tune: its result, the shape and length it trained at, the
    held-out loss, and where and when (validation may come from a later sitting than the draws)."""
    lines = []
    for arm, d in sorted(gates.items()):
        s, env = d.get("settings") or {}, d.get("environment") or {}
        held = next((g.get("detail", "") for g in d.get("gates") or [] if g.get("name") == "heldout_drop"), "")
        # records before the environment block name only their tier
        where = ", ".join(filter(None, [(env.get("gpu") or {}).get("name") or d.get("tier"),
                                        str(env.get("started") or "")[:10]]))
        lines.append(f"- {arm}: {'PASS' if d.get('passed') else 'FAIL'}, TRL SFT {s.get('steps')} steps x "
                     f"{s.get('grad_accum')} micro-batches of {s.get('batch')} x {s.get('seq_len')} tokens"
                     f"{'; ' + held.split(':')[0] if held else ''}{'; ' + where if where else ''}")
    return "\n**Training validation** (gates: results/<run>/validate/<arm>/gates.json):\n" + "\n".join(lines) + "\n" \
        if lines else ""


def session_note(sess: list[dict]) -> str:
    """The Markdown line under the table when a run's arms were measured in more than one session."""
    if len(sess) < 2:
        return ""
    parts = [f"{', '.join(s['arms'])} ({s['from'][:16].replace('T', ' ')}–{s['to'][11:16]} UTC"
             f"{', ' + s['gpu'] if s['gpu'] else ''})" for s in sess]
    return (f"\n**Measured in {len(sess)} sessions**: " + "; ".join(parts) +
            ". Ratios between arms of different sessions compare machines as well as stacks.\n")


def split_by_session(v: dict, sess: list[dict], arm: str = "unsloth_bf16") -> dict:
    """The verdict says so when its ratio crosses sessions (an arm with draws in two sessions crosses them too)."""
    where: dict[str, set[int]] = {}
    for i, s in enumerate(sess):
        for a in s["arms"]:
            where.setdefault(a, set()).add(i)
    ref, reason = v.get("reference"), v.get("reason", "")
    if ref and arm in where and ref in where and len(where[arm] | where[ref]) > 1:
        reason += f" [{arm} and {ref} were measured in different sessions]"
    return {**v, "reason": reason, "sessions": sess}


def _fmt(v, col):
    if v is None or v == "":
        return "—"
    if isinstance(v, float):
        return f"{v:.2f}x" if col.startswith("speedup") else (f"{v:.4g}")
    return str(v)


def markdown(lines: list[dict], cols: list[str], verdict_doc: dict, notes: list[str] = ()) -> str:
    show = ["arm", "status", "draws", "step_s", "step_s_iqr", "tokens_per_s", "peak_alloc_gb", "mem_after_load_gb",
            "expert_4bit_fraction"] + [c for c in cols if c.startswith("speedup")] + ["reason"]
    out = ["| " + " | ".join(show) + " |", "|" + "---|" * len(show)]
    for l in lines:
        cells = [_fmt(l.get(c), c) for c in show]
        if l.get("spread_flagged"):  # shown, not dropped: a noisy draw is still a draw
            cells[show.index("step_s_iqr")] += f" ⚠ {l['spread_flagged']} draw(s) over the spread limit"
        out.append("| " + " | ".join(cells) + " |")
    head = f"# {lines[0]['run_id']}: {lines[0]['model']} on {lines[0]['tier']}\n\n" if lines else ""
    body = "\n".join(out) + "\n" + "".join(f"\n{n}\n" for n in notes if n)
    return head + body + f"\n**Verdict: {verdict_doc['verdict']}** — {verdict_doc['reason']}\n" + beside_note(verdict_doc)


def beside_note(v: dict) -> str:
    """Other 4-bit arms, beside the reference and never in its place."""
    parts = [f"{a} {d['speedup']:.2f}x ({d['draws']} draw(s); experts 4-bit: "
             f"{'—' if d['expert_4bit_fraction'] is None else format(d['expert_4bit_fraction'], '.0%')})"
             for a, d in (v.get("beside") or {}).items()]
    return ("\nBeside the reference (not the verdict's): unsloth_bf16 vs " + "; ".join(parts) + "\n") if parts else ""


SHAPE_KEYS = ("seq_len", "batch")


def shape(envs: list[dict], cfg: dict) -> dict:
    """The shape the draws ran at and whether the run overrode its tier's own plan (and why)."""
    plan = next((e["plan"] for e in envs if e.get("plan")), {})
    over = {k: v for k, v in (cfg.get("plan_overrides") or {}).items()}
    out = {k: plan.get(k) for k in SHAPE_KEYS}
    if out["seq_len"] and out["batch"]:
        out["tokens_per_step"] = out["seq_len"] * out["batch"]
    out["overrides"] = over
    out["why"] = cfg.get("plan_overrides_why") or ("(no reason given)" if any(k in over for k in SHAPE_KEYS) else "")
    return out


def shape_note(sh: dict) -> str:
    if not sh.get("seq_len"):
        return ""
    line = f"**Shape**: batch {sh['batch']} × seq {sh['seq_len']} = {sh.get('tokens_per_step')} tokens per step"
    if sh["overrides"]:
        line += (" — overrides the tier's plan: " + ", ".join(f"{k} {v}" for k, v in sh["overrides"].items())
                 + (f" ({sh['why']})" if sh["why"] else ""))
    else:
        line += " (the tier's own plan)"
    return line


def shape_curve(rows: list[Row]) -> list[dict]:
    """The shape curve's points (stage `shape`, single draws): per shape, each arm's step time or why it has
    none, and the verdict pair's point ratio where both ran; the tier-shape verdict's own ratio is not among them."""
    pts: dict[tuple[int, int], dict] = {}
    for r in rows:
        p = parse_shape_metric(r.metric) if r.stage == "shape" else None
        if not p or p[0] != "step_s":
            continue
        cell = pts.setdefault((p[1], p[2]), {"batch": p[1], "seq_len": p[2], "tokens_per_step": p[1] * p[2],
                                             "arms": {}})
        cell["arms"][r.arm] = ({"step_s": r.value, "status": r.status} if r.status in VALUED
                               else {"status": r.status, "reason": r.reason})
    for cell in pts.values():
        a, b = (cell["arms"].get(x, {}) for x in ("unsloth_4bit", "unsloth_bf16"))
        if a.get("step_s") and b.get("step_s"):
            cell["ratio_4bit_over_bf16"] = a["step_s"] / b["step_s"]
            cell["degraded"] = "degraded" in (a["status"], b["status"])
    return [pts[k] for k in sorted(pts, key=lambda k: (k[0] * k[1], k))]


def curve_note(points: list[dict]) -> str:
    if not points:
        return ""
    arms = sorted({a for p in points for a in p["arms"]})
    out = ["**Shape curve** (one fresh-process draw per point, not a verdict; an OOM is a result):", "",
           "| shape | tokens/step | " + " | ".join(f"{a} s/step" for a in arms) + " | unsloth_4bit / unsloth_bf16 |",
           "|" + "---|" * (len(arms) + 3)]
    for p in points:
        cells = [f"{p['arms'][a]['step_s']:.4g}" if "step_s" in p["arms"].get(a, {}) else
                 (f"{p['arms'][a]['status']}: {p['arms'][a]['reason']}"[:60] if a in p["arms"] else "—") for a in arms]
        ratio = (f"{p['ratio_4bit_over_bf16']:.2f}x" + (" (degraded)" if p.get("degraded") else "")
                 if "ratio_4bit_over_bf16" in p else "—")
        out.append(f"| {p['batch']}×{p['seq_len']} | {p['tokens_per_step']} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(out)


def routing_ab(rows: list[Row]) -> list[dict]:
    """Per arm, raw against calibrated routers inside one process (stage `routing_ab`): median step time of each
    set's windows and their ratio, the largest peak memory and the mean load its windows routed; or why it has none."""
    out = []
    for arm in sorted({r.arm for r in rows if r.stage == "routing_ab"}):
        mine = {r.metric: r for r in rows if r.stage == "routing_ab" and r.arm == arm}
        ratio = mine.get("calibrated_over_raw_step_s")
        if not ratio or ratio.status not in VALUED:
            bad = ratio or next(iter(mine.values()))
            out.append({"arm": arm, "status": bad.status, "reason": bad.reason})
            continue
        win: dict[tuple[str, str], list[float]] = {}  # (router set, metric) -> its windows' values
        labels: dict[int, str] = {}  # window -> its router set
        for k, r in mine.items():
            if p := parse_window_metric(k):
                labels[p[1]] = p[2]
                if r.status in VALUED:
                    win.setdefault((p[2], p[0]), []).append(r.value)
        same = mine.get("windows_same_blocks")  # absent: sitting 5's A/B fed every window new blocks
        cell = {"arm": arm, "status": ratio.status, "reason": ratio.reason, "ratio": ratio.value,
                "windows": " ".join("A" if labels[w] == "raw" else "B" for w in sorted(labels))
                + (", same blocks" if same and same.value else ", new blocks each")}
        for label in ("raw", "calibrated"):
            loads = win.get((label, "router_max_over_mean"), [])
            peaks = win.get((label, "peak_alloc_gb")) or win.get((label, "peak_rss_gb"), [])
            cell[label] = {"step_s": mine[f"{label}_step_s"].value, "windows": len(win.get((label, "step_s"), [])),
                           "peak_gb": max(peaks) if peaks else None,
                           "max_over_mean": sum(loads) / len(loads) if loads else None}
        out.append(cell)
    return out


def routing_note(ab: list[dict]) -> str:
    if not ab:
        return ""
    f = lambda v, spec: "—" if v is None else format(v, spec)
    out = ["**Router load A/B** (one process per arm, raw (A) and calibrated (B) routers swapped in place between "
           "timed windows; load = max/mean tokens per expert in those windows, mean over layers):", "",
           "| arm | windows | raw s/step | calibrated s/step | calibrated / raw | raw load | calibrated load "
           "| peak GB raw / cal |", "|---|---|---|---|---|---|---|---|"]
    for c in ab:
        if "ratio" not in c:
            out.append(f"| {c['arm']} | {c['status']}: {c['reason']}"[:200] + " |  |  |  |  |  |  |")
            continue
        r, k = c["raw"], c["calibrated"]
        out.append(f"| {c['arm']} | {c['windows']} | {r['step_s']:.4g} | {k['step_s']:.4g} | {c['ratio']:.3f}"
                   + (" (degraded)" if c["status"] == "degraded" else "")
                   + f" | {f(r['max_over_mean'], '.2f')} | {f(k['max_over_mean'], '.2f')}"
                   f" | {f(r['peak_gb'], '.1f')} / {f(k['peak_gb'], '.1f')} |")
    return "\n".join(out)


def conditions_note(envs: list[dict]) -> str:
    """Where the arms ran under different conditions (attention, checkpointing, dtypes, optimizer, compile):
    a ratio between them is then a stack ratio, and the table says so."""
    per_arm: dict[str, dict] = {}
    for e in envs:
        if e.get("conditions"):  # an arm that never loaded (skipped, failed) has none to compare
            per_arm.setdefault(e["arm"], flat(e["conditions"]))
    keys = sorted({k for c in per_arm.values() for k in c})
    differ = [k for k in keys if len({str(c.get(k)) for c in per_arm.values()}) > 1]
    if not differ:
        return ""
    rows = [f"- {k}: " + "; ".join(f"{a} {c.get(k, '—')}" for a, c in sorted(per_arm.items())) for k in differ]
    return "**Conditions that differ between arms** (ratios below compare stacks, not only expert LoRA):\n" + "\n".join(rows)


def flat(d: dict, prefix: str = "") -> dict:
    """{"attention": {"implementation": "sdpa"}} -> {"attention.implementation": "sdpa"}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--inputs", nargs="+", required=True, help="per-draw metrics.csv files")
    ap.add_argument("--gates", nargs="*", default=[], help="validate/<arm>/gates.json files")
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--comparison", required=True)
    ap.add_argument("--markdown", required=True)
    ap.add_argument("--verdict", required=True)
    ap.add_argument("--model-sha", help="results/<run>/model.sha256: its router calibration becomes `model` rows")
    a = ap.parse_args(argv)
    cfg = cfgmod.load(a.config)
    draw_dirs = [Path(m).parent for m in a.inputs if Path(m).parent.parent.parent.name == "arms"]
    ab_dirs = [Path(m).parent for m in a.inputs if Path(m).parent.parent.name == "routing_ab"]
    rows = console_degraded(read_many(a.inputs), draw_dirs, cfg, ab_dirs)
    if a.model_sha and rows:
        rows += router_calibration.record_rows(a.model_sha, cfg["run"], rows[0].tier, cfg["model"]["name"])
    lines, derived = compare(rows, cfg["arms"], cfg.get("baselines", []))
    cols = COLUMNS + [f"speedup_vs_{b}" for b in cfg.get("baselines", [])]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for l in lines:
        w.writerow({k: ("" if l.get(k) is None else l.get(k)) for k in cols})
    vc, draws = cfg["verdict"], read_draws(rows, draw_dirs)
    v = speed_verdict(draws, vc["min_speedup"], vc.get("min_draws", 3), vc.get("allow_degraded", False),
                      vc.get("bootstrap_reps", 2000), vc.get("level", 0.95))
    v["beside"] = beside(draws)
    # training health joins the speed verdict; a run whose unsloth_bf16 was not validated is NOT TESTABLE
    gates = {d["arm"]: d for d in map(read_json, a.gates)}
    v = overall_verdict(v, mark_superseded(gates, rows))
    envs = [{**read_json(d / "env.json"), "arm": d.parent.name} for d in draw_dirs if (d / "env.json").exists()]
    sess = sessions(envs)
    v = split_by_session(v, sess)
    v["shape"] = shape(envs, cfg)
    curve = shape_curve(rows)
    if curve:  # only runs that measured one carry the key (committed verdicts stay as they were)
        v["shape_curve"] = curve
    ab = routing_ab(rows)
    if ab:
        v["routing_ab"] = ab
    write_rows(a.metrics, rows + derived)
    atomic_write(a.comparison, buf.getvalue())
    notes = [shape_note(v["shape"]), curve_note(curve), routing_note(ab), conditions_note(envs), session_note(sess),
             validation_note(gates)]
    atomic_write(a.markdown, markdown(lines, cols, v, notes))
    write_json(a.verdict, v)
    print(Path(a.markdown).read_text())


if __name__ == "__main__":
    main()
