"""The recipe's pages: recipe.md and the report's HTML page, with a ready-to-paste training snippet per pick
(templates in scripts/moebench/snippets/). Reads the recipe document moebench.recipe writes; no search here."""
from __future__ import annotations

import html
from pathlib import Path
from string import Template

from ..arms.unsloth_runtime import IMPORT_SWITCHES
from ..grid import mode_of

SNIPPETS = Path(__file__).resolve().parents[1] / "snippets"


def snippet_kind(setting: dict) -> str:
    arm, mode = setting["arm"], setting["mode"]
    if arm.startswith("unsloth"):
        return "unsloth_trl"
    if arm.startswith("e4b"):
        return "e4b"
    return "hf_peft_offload" if mode == "expert_offload" else "hf_peft"


# Measured on the H200 (Qwen3, 2026-12-02): tuned inside the compiled layer, Unsloth's autotune fails and falls back.
TRITON_NOTE = ("# unsloth_triton: Unsloth tunes its Triton MoE kernels at their first call; inside torch.compile that\n"
               "# tuning failed on the H200 ('Autotuner' ... 'best_config') and fell back to a slower path. moebench tunes\n"
               "# them eagerly before the first step (moebench.arms.unsloth_runtime.prewarm_moe_autotune).\n")


def render_snippet(setting: dict, cfg: dict, plan: dict, model: str = "path/to/model",
                   data: str = "train.jsonl", out: str = "lora-out", max_steps: int = 100) -> str:
    """A ready-to-paste training script with the pick's settings (the template in snippets/<kind>.py.tmpl)."""
    kind = snippet_kind(setting)
    lora = cfg.get("lora", {})
    attn = list(lora.get("attention", ["q_proj", "k_proj", "v_proj", "o_proj"]))
    mode = setting["mode"]
    arm = setting["arm"]
    gc_unsloth = {"unsloth": '"unsloth"', "plain": "True", "none": "False"}.get(mode, "True")
    load = {"unsloth_bf16": "load_in_4bit=False, load_in_16bit=True",
            "unsloth_4bit": "load_in_4bit=True",
            "unsloth_fp8": "load_in_4bit=False, load_in_fp8=True"}.get(arm, "load_in_4bit=False, load_in_16bit=True")
    env = {**IMPORT_SWITCHES, "UNSLOTH_MOE_BACKEND": plan.get("moe_backend") or "grouped_mm",
           **(plan.get("unsloth_env") or {})}
    fields = dict(model=model, data=data, out=out, seq=setting["seq_len"], batch=setting["batch"],
                  r=lora.get("r", 64), alpha=lora.get("alpha", 64), attention=repr(attn),
                  experts="True" if lora.get("experts", True) else "False", max_steps=max_steps,
                  gc="False" if mode == "none" else "True", gc_unsloth=gc_unsloth, load=load, arm=arm,
                  quant=", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=\"nf4\", "
                        "bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True)"
                  if arm == "hf_bnb4" else "",
                  quant_import="from transformers import BitsAndBytesConfig\n" if arm == "hf_bnb4" else "",
                  env=repr(env), triton_note=TRITON_NOTE if env["UNSLOTH_MOE_BACKEND"] == "unsloth_triton" else "",
                  label=f"{arm}, batch {setting['batch']} x seq {setting['seq_len']}, {mode}")
    return Template((SNIPPETS / f"{kind}.py.tmpl").read_text()).substitute(fields)


def _fmt(v, unit="") -> str:
    if v is None:
        return "—"
    return (f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}") + (f" {unit}" if unit else "")


def _points_hint(items) -> str:
    """The config that measures these settings (those at the arm's own checkpointing mode): recipe.points."""
    specs = sorted({x["point"] for x in items or [] if x.get("point")})
    return f"; config `recipe.points: [{', '.join(specs)}]` measures them" if specs else ""


SEARCH_STAGES = ("offload", "shape", "point", "sweep")  # the recipe's search, beyond the benchmark's own draws


def cost_line(cost: dict) -> str:
    """What the grid cost, in the logged wall time of its processes (GPU-minutes on a GPU tier)."""
    part = lambda st, c: f"{st} {c['seconds'] / 60:.1f} min ({c['logs']} log{'s' if c['logs'] != 1 else ''}" + (
        f", {c['missing']} not here)" if c["missing"] else ")")
    search = sum(c["seconds"] for st, c in cost.items() if st in SEARCH_STAGES)
    return ("Logged process time behind this grid (model builds and start-up not counted): "
            + "; ".join(part(st, c) for st, c in sorted(cost.items()))
            + f". The search beyond the benchmark's draws ({', '.join(SEARCH_STAGES)}): {search / 60:.1f} min.")


def follow_ups(doc: dict) -> list[tuple[str, list[str]]]:
    """The page's lists after the picks, (title, items), each only where it has items."""
    out = [("Arms that cannot win a pick (not refined further)", [f"{x['arm']}: {x['why']}" for x in doc["pruned"]]),
           ("Still to measure before these picks stand" + _points_hint(doc["next"]),
            [f"{x['label']}: {x['draws_needed']} more draw(s) (for {x['pick']})" for x in doc["next"]]),
           ("Worth measuring next (unmeasured neighbours of the fastest pick)" + _points_hint(doc.get("refine")),
            [x["label"] for x in doc.get("refine") or []])]
    return [(t, items) for t, items in out if items]


def snippets(doc: dict, cfg: dict, plan: dict) -> list[tuple[str, str]]:
    """(title, code) of one training snippet per distinct picked setting."""
    out, seen = [], set()
    for p, v in doc["picks"].items():
        if v["status"] != "none" and v["label"] not in seen:
            seen.add(v["label"])
            out.append((f"Training snippet: {v['label']} ({p})", render_snippet(v["setting"], cfg, plan).rstrip()))
    return out


def render_md(doc: dict, cfg: dict, plan: dict) -> str:
    card = doc["card"]
    lines = [f"# Recipe: {doc['run']} on {card['name'] or 'CPU'}", ""]
    if doc["limit_gib"] is not None:
        lines.append(f"Card memory {card['memory_gib']} GiB; headroom {doc['headroom']:.0%} leaves "
                     f"{doc['limit_gib']:.1f} GiB for a configuration to count as fitting.")
    if doc.get("note"):
        lines.append(doc["note"])
    lines += ["", "Each pick is a measured setting (never interpolated): the median over fresh-process draws, "
              "min–max beside it. A pick needs "
              f"{doc['rules']['min_draws']} draws ({doc['rules']['close_draws']} within "
              f"{doc['rules']['close']:.0%} of the runner-up).", "",
              "| pick | setting | value | draws (min–max) | status |", "|---|---|---|---|---|"]
    for p, v in doc["picks"].items():
        if v["status"] == "none":
            lines.append(f"| {v['question']} | — | — | — | none: {v['reason']} |")
            continue
        extra = f" (gross {_fmt(v.get('gross_j_per_token'))})" if p == "lowest_energy" else ""
        status = v["status"] + (f": {v['missing']}" if v.get("missing") else "")
        lines.append(f"| {v['question']} | {v['label']} | {_fmt(v['value'], v['unit'])}{extra} | "
                     f"{v['n']} ({_fmt(v['min'])}–{_fmt(v['max'])}) | {status} |")
    for title, items in follow_ups(doc):
        lines += ["", f"{title}:", ""] + [f"- {i}" for i in items]
    if doc.get("cost"):
        lines += ["", cost_line(doc["cost"])]
    for title, code in snippets(doc, cfg, plan):
        lines += ["", f"## {title}", "", "```python", code, "```"]
    return "\n".join(lines) + "\n"


def render_html(doc: dict, cfg: dict, plan: dict) -> str:
    """The report's recipe page: the picks (with the provenance ids each rests on), what was left out and why,
    and each pick's training snippet."""
    from .tables import html_page, html_table

    esc, card = html.escape, doc["card"]
    head = (f"Card {esc(str(card['name'] or 'CPU'))}"
            + (f", {card['memory_gib']:.1f} GiB; headroom {doc['headroom']:.0%} leaves {doc['limit_gib']:.1f} GiB"
               if doc["limit_gib"] is not None else "") + ". " + esc(doc.get("note") or "")
            + f" Each pick is a measured setting, the median over fresh-process draws (min–max beside it); a pick "
            f"needs {doc['rules']['min_draws']} draws ({doc['rules']['close_draws']} within "
            f"{doc['rules']['close']:.0%} of the runner-up). Grid searched: {len(doc['grid'])} setting(s).")
    rows, classes = [], []
    for p, v in doc["picks"].items():
        if v["status"] == "none":
            rows.append([esc(v["question"]), "—", "—", "—", esc(f"none: {v['reason']}"), ""])
        else:
            rows.append([esc(v["question"]), esc(v["label"]), esc(_fmt(v["value"], v["unit"])),
                         esc(f"{v['n']} ({_fmt(v['min'])}–{_fmt(v['max'])})"),
                         esc(v["status"] + (f": {v['missing']}" if v.get("missing") else "")),
                         "<br>".join(f"<code>{esc(i)}</code>" for i in v.get("ids", []))])
        classes.append(v["status"] if v["status"] in ("degraded", "skipped", "failed") else "")
    body = f"<p>{head}</p>" + html_table(["pick", "setting", "value", "draws (min–max)", "status", "provenance ids"],
                                        rows, classes, raw=True)
    for title, items in follow_ups(doc):
        body += f"<h3>{esc(title)}</h3><ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>"
    for title, code in snippets(doc, cfg, plan):
        body += f"<h3>{esc(title)}</h3><pre>{esc(code)}</pre>"
    return html_page(f"{doc['run']}: the recipe for this card", body)
