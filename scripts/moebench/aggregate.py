"""Aggregate a run: all rows into metrics.csv, the comparison table (CSV + Markdown) with speedups against the
baseline arms, and the verdict. Speedups are ratios of medians measured in the same run; where its draws span more
than one session (machine or lease), the table and the verdict say so."""
from __future__ import annotations

import argparse
import statistics
from datetime import datetime
from pathlib import Path

from . import config as cfgmod
from .io import atomic_write, read_json, shorten, write_json
from .metrics import Row, read_many, write_rows

COLUMNS = ["run_id", "tier", "model", "arm", "precision", "status", "reason", "draws", "step_s", "step_s_iqr",
           "draw_range_s", "tokens_per_s", "peak_alloc_gb", "mem_after_load_gb", "load_s", "expert_lora_params",
           "expert_4bit_fraction"]


def _measured(rows, metric):
    return [r for r in rows if r.metric == metric and r.status == "measured"]


def arm_summary(arm: str, rows: list[Row]) -> dict:
    """One line per arm: medians over draws (each draw's value is itself a median over timed steps)."""
    mine = [r for r in rows if r.arm == arm and r.stage == "bench"]
    steps = _measured(mine, "step_s")
    first = mine[0]
    out = {"run_id": first.run_id, "tier": first.tier, "model": first.model, "arm": arm, "precision": first.precision}
    if not steps:
        bad = next((r for r in mine if r.status != "measured"), first)
        return {**out, "status": bad.status, "reason": bad.reason, "draws": 0}
    med = lambda m: statistics.median(r.value for r in _measured(mine, m)) if _measured(mine, m) else None
    mx = lambda m: max((r.value for r in _measured(mine, m)), default=None)
    step = statistics.median(r.value for r in steps)
    tok = med("tokens_per_s")
    return {**out, "status": "measured", "reason": "", "draws": len(steps), "step_s": step,
            "step_s_iqr": statistics.median(r.spread or 0.0 for r in steps),
            "draw_range_s": max(r.value for r in steps) - min(r.value for r in steps),
            "tokens_per_s": tok, "peak_alloc_gb": mx("peak_alloc_gb") or mx("peak_rss_gb"),
            "mem_after_load_gb": med("alloc_after_load_gb") or med("rss_after_load_gb"), "load_s": med("load_s"),
            "expert_lora_params": med("expert_lora_params"), "expert_4bit_fraction": med("expert_weights_4bit_fraction")}


def compare(rows: list[Row], arms: list[str], baselines: list[str]) -> tuple[list[dict], list[Row]]:
    """Comparison lines, plus `compare` rows (speedups) so the provenance holds every derived number too."""
    lines = [arm_summary(a, rows) for a in arms if any(r.arm == a for r in rows)]
    by_arm = {l["arm"]: l for l in lines}
    derived = []
    for line in lines:
        for base in baselines:
            col = f"speedup_vs_{base}"
            b = by_arm.get(base)
            if line["status"] != "measured" or not b or b["status"] != "measured":
                line[col] = None
                continue
            line[col] = b["step_s"] / line["step_s"]
            derived.append(Row(line["run_id"], line["tier"], line["model"], line["arm"], line["precision"], "compare",
                               col, line[col], "x", line["draws"], None, "measured", "",
                               "comparison.csv"))
    return lines, derived


FOUR_BIT = ("unsloth_4bit", "e4b_4bit", "hf_bnb4")


def four_bit_reference(by_arm: dict) -> tuple[dict | None, str]:
    """The 4-bit QLoRA arm bf16 Split LoRA is judged against: unsloth_4bit when it was measured, else the
    fastest measured arm whose experts really are 4-bit after load (the census, not the flag: hf_bnb4 leaves
    GPT-OSS's fused experts in bf16)."""
    q = by_arm.get("unsloth_4bit")
    if q and q["status"] == "measured":
        return q, ""
    why = f"unsloth_4bit {q['status']}: {shorten(q['reason'], 160)}" if q else "unsloth_4bit not in this run"
    real = [l for a, l in by_arm.items() if a in FOUR_BIT and l["status"] == "measured"
            and (l.get("expert_4bit_fraction") or 0) > 0.5]
    if not real:
        return None, why + "; no other arm with 4-bit experts was measured"
    best = min(real, key=lambda l: l["step_s"])
    return best, f"{why}; judged against {best['arm']}, the fastest measured arm with 4-bit experts"


def verdict(by_arm: dict, min_speedup: float) -> dict:
    """The seed notebook's rule: bf16 Split LoRA is worth it when it beats 4-bit QLoRA by min_speedup with
    expert LoRA present. Training gates join once the validation stage has run."""
    bf = by_arm.get("unsloth_bf16")
    ref, note = four_bit_reference(by_arm)
    if not bf or bf["status"] != "measured" or ref is None:
        why = f"unsloth_bf16 {bf['status']} ({bf['reason']})" if bf and bf["status"] != "measured" else \
            ("unsloth_bf16 not in this run" if not bf else note)
        return {"verdict": "NOT TESTABLE", "reason": why, "speedup": None, "min_speedup": min_speedup,
                "reference": None}
    sp = ref["step_s"] / bf["step_s"]
    lora_ok = (bf.get("expert_lora_params") or 0) > 0
    ok = sp >= min_speedup and lora_ok
    reason = f"unsloth_bf16 is {sp:.2f}x {ref['arm']} (rule: >= {min_speedup}x, expert LoRA present)"
    return {"verdict": "VIABLE" if ok else "NOT VIABLE", "speedup": sp, "min_speedup": min_speedup,
            "reference": ref["arm"], "expert_lora_present": lora_ok,
            "reason": reason + (f" [{note}]" if note else "")}


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


def markdown(lines: list[dict], cols: list[str], verdict_doc: dict, note: str = "") -> str:
    show = ["arm", "status", "draws", "step_s", "step_s_iqr", "tokens_per_s", "peak_alloc_gb", "mem_after_load_gb",
            "expert_4bit_fraction"] + [c for c in cols if c.startswith("speedup")] + ["reason"]
    out = ["| " + " | ".join(show) + " |", "|" + "---|" * len(show)]
    for l in lines:
        out.append("| " + " | ".join(_fmt(l.get(c), c) for c in show) + " |")
    head = f"# {lines[0]['run_id']}: {lines[0]['model']} on {lines[0]['tier']}\n\n" if lines else ""
    return head + "\n".join(out) + f"\n{note}\n**Verdict: {verdict_doc['verdict']}** — {verdict_doc['reason']}\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--inputs", nargs="+", required=True, help="per-draw metrics.csv files")
    ap.add_argument("--gates", nargs="*", default=[], help="validate/<arm>/gates.json files")
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--comparison", required=True)
    ap.add_argument("--markdown", required=True)
    ap.add_argument("--verdict", required=True)
    a = ap.parse_args(argv)
    cfg = cfgmod.load(a.config)
    rows = read_many(a.inputs)
    lines, derived = compare(rows, cfg["arms"], cfg.get("baselines", []))
    cols = COLUMNS + [f"speedup_vs_{b}" for b in cfg.get("baselines", [])]
    import csv, io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for l in lines:
        w.writerow({k: ("" if l.get(k) is None else l.get(k)) for k in cols})
    v = verdict({l["arm"]: l for l in lines}, cfg["verdict"]["min_speedup"])
    from .validate import mark_superseded, overall_verdict

    # training health joins the speed verdict; a run whose unsloth_bf16 was not validated is NOT TESTABLE
    v = overall_verdict(v, mark_superseded({d["arm"]: d for d in map(read_json, a.gates)}, rows))
    envs = [read_json(p) for p in (Path(m).parent / "env.json" for m in a.inputs) if p.exists()]
    sess = sessions(envs)
    v = split_by_session(v, sess)
    write_rows(a.metrics, rows + derived)
    atomic_write(a.comparison, buf.getvalue())
    atomic_write(a.markdown, markdown(lines, cols, v, session_note(sess)))
    write_json(a.verdict, v)
    print(Path(a.markdown).read_text())


if __name__ == "__main__":
    main()
