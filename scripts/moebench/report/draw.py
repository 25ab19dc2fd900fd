"""Drawing primitives shared by the report's figures: one size and type scale for every figure (readable in the
report at a 1400 px wide window), median bars with per-draw dots, numbered gap notes, hatched degraded bars, and
saving a figure with its sidecars (numbers drawn, caption, and how big it came out)."""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report builds on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from ..io import atomic_write, write_json  # noqa: E402
from .runs import Series  # noqa: E402

# The report shows a figure in a panel about 1000-1100 px wide at a 1400 px window: 10.5 in at 100 dpi is drawn
# near its own size, so 9 pt text stays >= 9 px on screen. Every text is >= MIN_FONT_PT (the Chromium test reads
# it back from each figure's sidecar).
DPI = 100
WIDTH_IN = 10.5
MIN_FONT_PT = 9.0
GAP_COLOR = "0.40"
DEGRADED_HATCH = "///"
plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "xtick.labelsize": 9.5,
                     "ytick.labelsize": 9.5, "legend.fontsize": 9, "legend.title_fontsize": 9.5,
                     "figure.titlesize": 11.5})


def figure(panels: int = 1, height: float = 4.6, width: float = WIDTH_IN):
    fig, axes = plt.subplots(1, panels, figsize=(width, height), squeeze=False)
    return fig, list(axes[0])


def wrap(notes: list[str], width: int = 110) -> list[str]:
    return [line for n in notes for line in textwrap.wrap(n, width, subsequent_indent="      ")]


def write_notes(fig, notes: list[str], width: int = 110):
    """Gap reasons and notes go under the axes; bbox_inches='tight' grows the image downwards to hold them (the
    width stays that of the axes: lines are wrapped to it)."""
    if notes:
        fig.text(0.01, -0.02, "\n".join(wrap(notes, width)), va="top", ha="left", fontsize=MIN_FONT_PT,
                 family="monospace")


def empty(ax, message: str):
    ax.set_xticks([]), ax.set_yticks([])
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(message, 70)), ha="center", va="center", fontsize=10.5,
            color=GAP_COLOR, transform=ax.transAxes)


def note(notes: list[str], text: str) -> int:
    """Number a footnote, reusing the number of an identical one (the same gap in two panels)."""
    for i, n in enumerate(notes):
        if n.partition("] ")[2] == text:
            return i + 1
    notes.append(f"[{len(notes) + 1}] {text}")
    return len(notes)


def grouped_reasons(ss: list[Series]) -> str:
    """'skipped: needs CUDA — hf_bf16, hf_bnb4; ...': one entry per distinct reason, naming its arms."""
    by: dict[str, list[str]] = {}
    for s in ss:
        by.setdefault(s.gap or "no rows", []).append(s.arm)
    return "; ".join(f"{r} — {', '.join(a)}" for r, a in by.items()) if by else "no arms"


def dotbar(ax, ss: list[Series], ylabel: str, what: str, notes: list[str], color: str = "#7fa7d6"):
    """Median bar per arm with each draw as a dot; a gap keeps its slot and carries a numbered reason; a degraded
    arm's bar is hatched and labelled (its value came from a fallback path, never a plain measurement)."""
    if not any(s.median is not None for s in ss):
        empty(ax, f"no measured rows for {what} ({grouped_reasons(ss)})")
        return
    values = [v for s in ss for v in [s.median] + [p["value"] for p in s.points] if v is not None]
    top = max(values)
    for i, s in enumerate(ss):
        if s.median is None:
            k = note(notes, f"{s.arm}: {s.gap}")
            ax.text(i, top * 0.04, f"{s.gap.split(':')[0]} [{k}]", rotation=90, ha="center", va="bottom",
                    color=GAP_COLOR, fontsize=MIN_FONT_PT, style="italic")
            continue
        ax.bar(i, s.median, width=0.7, color="white" if s.degraded else color, edgecolor="#b8860b" if s.degraded
               else color, hatch=DEGRADED_HATCH if s.degraded else None, linewidth=1.2)
        xs = [i + 0.12 * ((j % 3) - 1) for j in range(len(s.points))]
        ax.scatter(xs, [p["value"] for p in s.points], color="black", s=22, zorder=3)
        hi = max([s.median] + [p["value"] for p in s.points])
        label = f"{s.median:.3g}"
        if s.degraded:
            label += f"\ndegraded [{note(notes, f'{s.arm}: {s.degraded}')}]"
        ax.text(i, hi + top * 0.02, label, ha="center", va="bottom", fontsize=MIN_FONT_PT + 0.5, weight="bold")
    ax.set_xticks(range(len(ss)), [s.arm for s in ss], rotation=15)
    ax.set_xlim(-0.6, len(ss) - 0.4)
    ax.set_ylim(0, top * 1.2)
    ax.set_ylabel(ylabel)


def min_font_pt(fig) -> float:
    """The smallest font of any visible, non-empty text in the figure (titles, ticks, legends, notes)."""
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    return min(sizes) if sizes else MIN_FONT_PT


def save(fig, out: Path, name: str, payload: dict, caption: str):
    """The PNG, `<name>.json` (numbers drawn + `render`: pixel size, dpi, smallest font) and `<name>.caption.rst`."""
    out.mkdir(parents=True, exist_ok=True)
    smallest = min_font_pt(fig)
    fig.savefig(out / f"{name}.png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    from PIL import Image

    with Image.open(out / f"{name}.png") as img:
        w, h = img.size
    payload = {**payload, "render": {"width_px": w, "height_px": h, "dpi": DPI, "min_font_pt": smallest}}
    write_json(out / f"{name}.json", payload)
    atomic_write(out / f"{name}.caption.rst", caption)
