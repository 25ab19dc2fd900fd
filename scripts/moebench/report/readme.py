"""README.md and docs/results.md: their results figures rendered from the committed runs' provenance.

A template (docs/templates/<page>.md) holds the prose; every results figure in it is a placeholder that names
the provenance id it comes from, so no figure is typed by hand:

    {{ <id> | <format> }}                 one number: results/<run>/provenance.json's entry <id>
    {{ <id> / <id> | <format> }}          the ratio of two numbers (e.g. the same arm on two tiers)
    {{ verdict <run> <key> | <format> }}  a field of results/<run>/verdict.json (interval.0: a list's item),
                                          whose sha256 must equal
                                          the one provenance.json records for it
    {{ table <kind> <run>:<arm> ... }}    a Markdown table, one row per run:arm (kinds: TABLES below)

<format> is a Python format spec (`.3f`, `.0f`, `.1%`), optionally followed by text added after the number
(`.2f x` -> `2.14x`); `-` before the spec prints a typographic minus for negatives. Only committed runs are
read (their provenance.json tracked by git), so `make run`'s local CPU results never reach the README. Every
rendered figure is listed in docs/figures.json with its ids, value and the sha256 of the provenance it came
from: the provenance of cross-run ratios, which no single run holds. That file is a hash chain of its own
(audits/.ots-history/cross-run-figures/, a new revision only when a figure changed), stamped like a run's
provenance (`make docs`) and checked by `python -m moebench.audit`, which recomputes every figure.

    python -m moebench.report.readme            # render README.md, docs/results.md, docs/figures.json
    python -m moebench.report.readme --check    # exit 1, naming the page, when a rendered file differs
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from ..chain import DEFAULT_HISTORY, ChainError, commit, history_dir
from ..io import read_json, sha256_file
from ..metrics import VALUED

ROOT = Path(__file__).resolve().parents[3]
PAGES = {"docs/templates/README.md": "README.md", "docs/templates/results.md": "docs/results.md"}
FIGURES = "docs/figures.json"
FIGURES_CHAIN = "cross-run-figures"  # its history: audits/.ots-history/cross-run-figures/
PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.S)
BANNER = ("<!-- GENERATED from {src} by `python -m moebench.report.readme` (make docs): edit the template; every "
          "results figure comes from results/<run>/provenance.json. -->\n")


class RenderError(ValueError):
    """A placeholder that cannot be rendered: the message names the page, the placeholder and why."""


@dataclass
class Sources:
    """The committed runs' provenance, read once each; every figure rendered is logged in `figures`."""

    root: Path
    committed_only: bool = True
    numbers: dict[str, dict] = field(default_factory=dict)
    shas: dict[str, str] = field(default_factory=dict)
    figures: list[dict] = field(default_factory=list)

    def _prov(self, run: str) -> Path:
        p = self.root / "results" / run / "provenance.json"
        if not p.is_file():
            raise RenderError(f"no results/{run}/provenance.json: a page may only quote a run with provenance")
        if self.committed_only and run.startswith("local"):
            raise RenderError(f"results/{run} is a local run: README and docs quote committed runs only")
        if self.committed_only and not _tracked(self.root, p):
            raise RenderError(f"results/{run}/provenance.json is not committed: commit the run before quoting it")
        return p

    def run(self, run: str) -> dict[str, dict]:
        if run not in self.shas:
            p = self._prov(run)
            self.shas[run] = sha256_file(p)
            self.numbers.update({n["id"]: n for n in read_json(p)["numbers"]})
        return self.numbers

    def entry(self, nid: str) -> dict:
        run = nid.split("/", 1)[0]
        n = self.run(run).get(nid)
        if n is None:
            raise RenderError(f"{nid} is not in results/{run}/provenance.json")
        return n

    def value(self, nid: str) -> float:
        """A measured number; `<id>#<field>` reads another field of the entry (e.g. `#spread`, the IQR)."""
        nid, _, fld = nid.partition("#")
        n = self.entry(nid)
        if n.get("status") not in VALUED or not isinstance(n.get(fld or "value"), (int, float)):
            raise RenderError(f"{nid} has no measured {fld or 'value'} (status {n.get('status')}: {n.get('reason')})")
        return float(n[fld or "value"])

    def measured(self, nid: str) -> bool:
        """A number is there: measured, or measured on a fallback path (degraded; rendered so, never plain)."""
        n = self.run(nid.split("/", 1)[0]).get(nid) or {}
        return n.get("status") in VALUED and isinstance(n.get("value"), (int, float))

    def degraded(self, ids: list[str]) -> bool:
        return any((self.run(i.split("/", 1)[0]).get(i.partition("#")[0]) or {}).get("status") == "degraded"
                   for i in ids)

    def matching(self, pattern: str) -> list[str]:
        """Measured ids matching a glob whose first segment (the run) is literal."""
        numbers = self.run(pattern.split("/", 1)[0])
        return sorted(i for i in numbers if fnmatch.fnmatchcase(i, pattern) and self.measured(i))

    def verdict(self, run: str) -> dict:
        self.run(run)
        doc = json.loads((self.root / "results" / run / "provenance.json").read_text())
        p = self.root / "results" / run / "verdict.json"
        want = (doc.get("inputs", {}).get("verdict") or {}).get("sha256")
        if not p.is_file() or sha256_file(p) != want:
            raise RenderError(f"results/{run}/verdict.json does not match the sha256 its provenance.json records")
        return json.loads(p.read_text())

    def log(self, text: str, value, ids: list[str], expr: str):
        if self.degraded(ids):  # a number from a fallback path never reads as a plain measurement
            text += " (degraded)"
        runs = sorted({i.split("/", 1)[0] for i in ids})
        self.figures.append({"text": text, "value": value, "expr": expr.strip(), "ids": ids,
                             "provenance_sha256": {r: self.shas[r] for r in runs}})
        return text


def _tracked(root: Path, path: Path) -> bool:
    r = subprocess.run(["git", "ls-files", "--error-unmatch", str(path.relative_to(root))], cwd=root,
                       capture_output=True)
    return r.returncode == 0


def fmt(value, spec: str) -> str:
    """`.3f`, `.2f x` (a suffix after a space), `-.1%` (typographic minus)."""
    spec, _, suffix = spec.strip().partition(" ")
    minus = spec.startswith("-")
    text = format(value, spec[1:] if minus else spec) if isinstance(value, (int, float)) else str(value)
    if minus:
        text = text.replace("-", "−")
    return text + suffix


# ---- tables: one row per run:arm ----------------------------------------------------------------------------
def _c(src: Sources, run: str, arm: str, stage: str, metric: str, spec: str, draw: str = "all") -> str:
    nid = f"{run}/{stage}/{arm}/{draw}/{metric}"
    v = src.value(nid)
    return src.log(fmt(v, spec), v, [nid], nid)


def _speedup(src: Sources, run: str, arm: str, base: str) -> str:
    """The compare row when aggregate wrote one; else the ratio of the two comparison medians (both cited)."""
    nid = f"{run}/compare/{arm}/all/speedup_vs_{base}"
    if nid in src.run(run):
        return _c(src, run, arm, "compare", f"speedup_vs_{base}", ".2f x")
    a, b = f"{run}/comparison/{base}/all/step_s", f"{run}/comparison/{arm}/all/step_s"
    v = src.value(a) / src.value(b)
    return src.log(fmt(v, ".2f x"), v, [a, b], f"{a} / {b}")


def row_tiers(src, run, arm):
    cells = [_c(src, run, arm, "comparison", m, s) for m, s in
             (("step_s", ".3f"), ("tokens_per_s", ".0f"), ("peak_alloc_gb", ".1f"), ("expert_4bit_fraction", ".2f"))]
    return [run, arm, *cells, _speedup(src, run, arm, "hf_bf16")]


def _step_or_why(src: Sources, run: str, arm: str) -> str:
    """The arm's median step time, or what its bench rows say instead (skipped / failed / not in the run)."""
    if src.measured(f"{run}/comparison/{arm}/all/step_s"):
        return _c(src, run, arm, "comparison", "step_s", ".3f")
    rows = [n for i, n in src.run(run).items() if i.startswith(f"{run}/bench/{arm}/") and i.endswith("/step_s")]
    return rows[0]["status"] if rows else "not in run"


def row_headline(src, run, arm):
    """run | model | tier | unsloth_bf16 s/step | unsloth_4bit s/step | 4-bit step time over bf16's."""
    some = next(n for i, n in src.run(run).items() if i.startswith(f"{run}/comparison/"))
    bf, four = (_step_or_why(src, run, a) for a in ("unsloth_bf16", "unsloth_4bit"))
    a, b = f"{run}/comparison/unsloth_4bit/all/step_s", f"{run}/comparison/unsloth_bf16/all/step_s"
    ratio = "—"
    if src.measured(a) and src.measured(b):
        v = src.value(a) / src.value(b)
        ratio = src.log(fmt(v, ".2f x"), v, [a, b], f"{a} / {b}")
    return [run, some["model"], some["tier"], bf, four, ratio]


def row_h100(src, run, arm):
    """arm | step | tokens/s | peak | expert bytes 4-bit | J/token per draw | vs hf_bf16; an arm that did not run
    gives its status (skipped / failed) and dashes."""
    if not src.measured(f"{run}/comparison/{arm}/all/step_s"):
        return [arm, _step_or_why(src, run, arm), "—", "—", "—", "—", "—"]
    cells = [_c(src, run, arm, "comparison", m, s) for m, s in
             (("step_s", ".3f"), ("tokens_per_s", ".0f"), ("peak_alloc_gb", ".1f"), ("expert_4bit_fraction", ".2f"))]
    draws = sorted(i.split("/")[3] for i in src.run(run) if i.startswith(f"{run}/energy/{arm}/d")
                   and i.endswith("/j_per_token"))
    joules = " / ".join(_c(src, run, arm, "energy", "j_per_token", ".3f", d) for d in draws) or "—"
    return [arm, *cells, joules, _speedup(src, run, arm, "hf_bf16")]


def row_validation(src, run, arm):
    """arm | optimizer steps | train rows | held-out before → after | loss drop | expert grads | reload | peak."""
    def c(m, s):
        return _c(src, run, arm, "validate", m, s)

    nid = f"{run}/validate/{arm}/all/expert_lora_tensors"
    gid = f"{run}/validate/{arm}/all/gate_expert_grads_value"
    n, got = int(src.value(nid)), src.value(gid) * src.value(nid)  # the fraction with a gradient, as a count
    grads = src.log(f"{round(got)} / {n}", got, [gid, nid], f"{gid} * {nid}")
    reload = f"{c('reload_logits_max_abs_diff', '.3g')} ({c('reload_trained_autocast_max_abs_diff', '.3g')})"
    return [arm, c("optimizer_steps", ".0f"), c("packed_train_sequences", ".0f"),
            f"{c('heldout_loss_before', '.2f')} → {c('heldout_loss_after', '.3g')}",
            "−" + c("gate_loss_drop_value", ".1%"), grads, reload, c("peak_alloc_gb", ".1f")]


TABLES = {
    "headline": (["run", "model", "tier", "unsloth_bf16 s/step", "unsloth_4bit s/step", "bf16 speed / 4-bit"],
                 row_headline),
    "tiers": (["run", "arm", "median step (s)", "tokens/s", "peak alloc (GB)", "expert bytes 4-bit", "vs hf_bf16"],
              row_tiers),
    "h100": (["arm", "median step (s)", "tokens/s", "peak alloc (GB)", "expert bytes 4-bit", "J/token per draw",
              "vs hf_bf16"], row_h100),
    "validation": (["arm", "optimizer steps", "train rows", "held-out loss before → after", "last-10 vs first-10 loss",
                    "expert LoRA tensors with a gradient", "reload: max logit diff (autocast vs plain)",
                    "peak alloc (GB)"], row_validation),
}


def table(src: Sources, kind: str, pairs: list[str]) -> str:
    if kind not in TABLES:
        raise RenderError(f"unknown table kind {kind!r}: one of {', '.join(TABLES)}")
    header, row = TABLES[kind]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for pair in pairs:
        run, _, arm = pair.partition(":")
        lines.append("| " + " | ".join(row(src, run, arm or "unsloth_bf16")) + " |")
    return "\n".join(lines)


# ---- placeholders -------------------------------------------------------------------------------------------
def expand(src: Sources, body: str) -> str:
    expr, _, spec = body.partition("|")
    words = expr.split()
    if not words:
        raise RenderError("empty placeholder")
    if words[0] == "table":
        return table(src, words[1], words[2:])
    if words[0] == "verdict":
        run, key = words[1], words[2]
        v = src.verdict(run)
        for part in key.split("."):  # interval.0: an item of a list field
            v = v[int(part)] if isinstance(v, list) and part.isdigit() and int(part) < len(v) else (
                v.get(part) if isinstance(v, dict) else None)
        if v is None:
            raise RenderError(f"results/{run}/verdict.json has no {key!r}")
        return src.log(fmt(v, spec), v, [f"{run}/verdict/{key}"], body)
    if words[0] == "range":  # "lo–hi" over every measured id matching the globs
        ids = [i for pat in words[1:] for i in src.matching(pat)]
        if not ids:
            raise RenderError(f"no measured id matches {' '.join(words[1:])}")
        vals = [src.value(i) for i in ids]
        lo, hi = fmt(min(vals), spec), fmt(max(vals), spec)
        text = lo if lo == hi else f"{lo} to {hi}" if "−" in lo + hi else f"{lo}–{hi}"
        return src.log(text, [min(vals), max(vals)], ids, body)
    if len(words) == 3 and words[1] == "/":
        a, b = src.value(words[0]), src.value(words[2])
        return src.log(fmt(a / b, spec), a / b, [words[0], words[2]], body)
    if len(words) == 1:
        v = src.value(words[0])
        return src.log(fmt(v, spec), v, [words[0]], body)
    raise RenderError(f"cannot read the placeholder {{{{{body}}}}}: see moebench.report.readme's docstring")


def reflow(text: str, width: int = 116) -> str:
    """Rewrap prose paragraphs and list items (placeholders change line lengths); tables, headings, code and
    comments stay as written."""
    out, block, fence = [], [], False

    def flush():
        items: list[list[str]] = []
        for line in block:
            if line.startswith(("- ", "* ")) or not items:
                items.append([line])
            else:
                items[-1].append(line.strip())
        for item in items:
            bullet = item[0].startswith(("- ", "* "))
            out.extend(textwrap.wrap(" ".join(item), width, subsequent_indent="  " if bullet else "",
                                     break_long_words=False, break_on_hyphens=False))
        block.clear()

    for line in text.splitlines():
        if line.startswith("```"):
            flush()
            fence = not fence
            out.append(line)
        elif fence or not line.strip() or line.startswith(("|", "#", "<!--", "    ")):
            flush()
            out.append(line)
        else:
            block.append(line)
    flush()
    return "\n".join(out) + "\n"


def render_text(src: Sources, template: str, name: str) -> str:
    def sub(m):
        try:
            return expand(src, m.group(1))
        except RenderError as exc:
            raise RenderError(f"{name}: {{{{{m.group(1).strip()}}}}}: {exc}") from None
    return BANNER.format(src=name) + reflow(PLACEHOLDER.sub(sub, template))


ABOUT = ("every results figure of README.md and docs/results.md, rendered from these provenance ids "
         "(moebench.report.readme); cross-run ratios rest on several runs' provenance, so this file has its own "
         "hash chain and timestamp")


def figures_doc(figures: list[dict]) -> dict:
    return {"about": ABOUT, "run": FIGURES_CHAIN, "figures": figures}


def figures_text(doc: dict) -> str:
    """The figures file's layout: its header keys (chain keys included) one per line, then one figure per line
    (its text as printed, value, the ids it rests on and their provenance.json sha256)."""
    head = {k: v for k, v in doc.items() if k != "figures"}
    lines = [json.dumps(f, sort_keys=True, ensure_ascii=False) for f in doc["figures"]]
    return ("{" + ",\n ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in head.items())
            + ',\n "figures": [\n' + ",\n".join(lines) + "\n]}\n")


def figures_json(figures: list[dict]) -> str:
    """The figures file as it would read outside any chain (tests)."""
    return figures_text(figures_doc(figures))


def commit_figures(root: Path, figures: list[dict], history: str = DEFAULT_HISTORY) -> str:
    """Write docs/figures.json as a revision of its own chain (<history>/cross-run-figures/, HEAD), the run
    provenance's mechanism: a new revision naming the previous one when a figure changed, else the file as the
    newest revision has it. Returns its text."""
    out = root / FIGURES
    commit(figures_doc(figures), out, history_dir(root / history, FIGURES_CHAIN), dump=figures_text)
    return out.read_text()


def render(root: Path = ROOT, committed_only: bool = True) -> tuple[dict[str, str], list[dict]]:
    """({output path: text} for every page, the figures they quote)."""
    src, out = Sources(root, committed_only), {}
    for tpl, dest in PAGES.items():
        out[dest] = render_text(src, (root / tpl).read_text(), tpl)
    return out, src.figures


def stale_pages(root: Path, pages: dict[str, str], figures: list[dict]) -> list[str]:
    """The pages under root that differ from their rendering (a hand-edited figure, or a changed run); the
    figures file by its figures (its chain header aside)."""
    stale = [p for p, text in pages.items() if not (root / p).is_file() or (root / p).read_text() != text]
    f = root / FIGURES
    try:
        same = json.loads(f.read_text())["figures"] == json.loads(json.dumps(figures))
    except (OSError, ValueError, KeyError):
        same = False
    return stale + ([] if same else [FIGURES])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    ap.add_argument("--root", default=str(ROOT))
    a = ap.parse_args(argv)
    root = Path(a.root)
    try:
        pages, figures = render(root)
    except RenderError as exc:
        print(f"moebench.report.readme: {exc}", file=sys.stderr)
        return 1
    stale = stale_pages(root, pages, figures)
    if a.check:
        for p in stale:
            print(f"{p} differs from its rendering from provenance: a figure was edited by hand or a template or "
                  "run changed; run `python -m moebench.report.readme` (make docs)", file=sys.stderr)
        return 1 if stale else 0
    try:
        commit_figures(root, figures)
    except ChainError as exc:
        print(f"moebench.report.readme: {exc}", file=sys.stderr)
        return 1
    for p, text in pages.items():
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
