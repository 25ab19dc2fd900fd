"""The report builds from the session's CPU run (conftest.cpu_run, in a clone) plus a committed-style run, and every
category and figure renders in a real browser (headless Chromium). The committed-style run `fx-gpu` is made-up
fixture data (test_plots)."""
from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import QUICK, clone, snakemake
from moebench.ids import row_id
from moebench.metrics import read_rows
from test_plots import SKIP_REASON, write_fixture

CATEGORIES = {"Throughput", "Memory", "Offload", "Energy", "Training", "Provenance"}
FIGURES = ["throughput", "speedup", "memory", "frontier", "energy", "loss"]
RUN = "local"


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("chromium is not installed (apt-get update && apt-get install -y chromium)")
    return exe


def _workspace(cpu_run: Path, tmp: Path) -> tuple[Path, list[str]]:
    """A clone of the CPU run with a committed-style run beside it: Snakemake adds only that run's pages and the
    cross-run view."""
    ws = clone(cpu_run, tmp)
    fx = write_fixture(ws / "results", run="fx-gpu")
    (fx / "PROVENANCE.md").write_text("# fx-gpu provenance (fixture)\n")
    # the fixture's provenance holds its rows under the ids provenance.py gives them (ids.row_id)
    numbers = [{"id": row_id(r), "value": r.value} for r in read_rows(fx / "metrics.csv")]
    (fx / "provenance.json").write_text(json.dumps({"numbers": numbers, "fixture": True}))
    (fx / "provenance_stamp.json").write_text(json.dumps({"status": "pending"}))
    targets = [f"results/{r}/{f}" for r in (RUN, "fx-gpu") for f in ("plots/throughput.png",
                                                                     "report/provenance.html")]
    return ws, targets + ["results/_report/tiers.png"]


def _sm(ws: Path, *args, timeout=600):
    # the CPU run's own config (QUICK): with another, its stages would rerun
    r = snakemake(ws, "--cores", "2", *args, *QUICK, timeout=timeout)
    assert r.returncode == 0, f"snakemake {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    return r


def _inject(page: str, script: str) -> str:
    """Add a script before the page's own closing body tag (the last one: vendor JS contains the string too)."""
    i = page.rindex("</body>")
    return page[:i] + script + page[i:]


def _text(fragment: str) -> str:
    """Rendered HTML as the reader sees it: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def _embedded(html_text: str, var: str, script_id: str | None = None):
    """The JSON Snakemake embeds in <script id=...>var x = ...;</script> (vendor scripts reuse the names)."""
    sid = script_id or var
    m = re.search(rf'<script id="{sid}">\s*var {var} = (.*?);\s*</script>', html_text, re.S)
    assert m, f"report has no `{var}`"
    return json.loads(m.group(1))


@pytest.fixture(scope="module")
def built(cpu_run, tmp_path_factory):
    ws, targets = _workspace(cpu_run, tmp_path_factory.mktemp("ws"))
    _sm(ws, *targets)
    _sm(ws, "--report", "report.html", *targets)
    text = (ws / "report.html").read_text()
    return ws, text


def test_categories_and_figures_present(built):
    ws, text = built
    cats, results = _embedded(text, "categories"), _embedded(text, "results")
    assert CATEGORIES <= set(cats), f"missing categories: {CATEGORIES - set(cats)}"
    for run in (RUN, "fx-gpu"):
        for f in FIGURES:
            assert f"results/{run}/plots/{f}.png" in results
        assert f"results/{run}/plots/gates.html" in results and f"results/{run}/report/provenance.html" in results
        assert run in cats["Throughput"] and run in cats["Provenance"]
    assert "results/fx-gpu/provenance.json" in results  # committed provenance file listed as a download
    for path, r in results.items():
        assert r["caption"].strip(), f"{path} has no caption"
        if r["mime_type"] == "image/png":
            img = Image.open(io.BytesIO(base64.b64decode(r["data_uri"].split(",", 1)[1])))
            assert img.size[0] > 400 and img.size[1] > 300, path


def test_captions_cite_numbers_and_ids(built):
    ws, text = built
    results = _embedded(text, "results")
    fx = _text(results["results/fx-gpu/plots/throughput.png"]["caption"])
    assert "fx-gpu/bench/unsloth_bf16/d1/tokens_per_s" in fx and "3050" in fx and SKIP_REASON in fx
    local = _text(results[f"results/{RUN}/plots/throughput.png"]["caption"])
    side = json.loads((ws / f"results/{RUN}/plots/throughput.json").read_text())
    for s in side["series"]:
        if s["median"] is not None:
            assert s["points"][0]["id"] in local
        else:
            assert s["gap"].replace("`", "'") in local, s["gap"]
    desc = _text(_embedded(text, "workflow_desc", "workflow-desc"))
    verdict = json.loads((ws / f"results/{RUN}/verdict.json").read_text())["verdict"]
    assert verdict in desc and "VIABLE" in desc  # fx-gpu's made-up verdict, from its verdict.json


# Runs in Chromium after the page's own scripts: every image of the report decodes (its natural width).
LOADED = """<script>
window.addEventListener('load', async () => {
  const out = {};
  await Promise.all(Object.entries(results).filter(([p, r]) => r.mime_type.startsWith('image/')).map(
    ([p, r]) => new Promise(done => { const i = new Image();
      i.onload = () => { out[p] = i.naturalWidth; done(); }; i.onerror = () => { out[p] = 0; done(); };
      i.src = r.data_uri; })));
  const d = document.createElement('pre'); d.id = 'loaded'; d.textContent = JSON.stringify(out);
  document.body.appendChild(d);
});
</script>"""

# Runs in Chromium after the page's own scripts: where the front page's title sits at scroll 0, then each figure
# opened in the report's image view, its shown and natural size. (It changes the view only, not the menu.)
PROBE = """<script>
window.addEventListener('load', async () => {
  const sleep = ms => new Promise(r => setTimeout(r, ms));
  await sleep(300);
  const out = {front: null, figures: {}};
  const t = document.querySelector('h1.title'), box = t && t.closest('.overflow-auto');
  if (t) { const r = t.getBoundingClientRect();
    out.front = {top: r.top, bottom: r.bottom, scroll: box ? box.scrollTop : null, vh: window.innerHeight}; }
  out.vw = window.innerWidth;
  for (const [p, r] of Object.entries(results).filter(([p, r]) => r.mime_type.startsWith('image/'))) {
    app.setView({content: "img", contentPath: r.data_uri});
    await sleep(250);
    const img = [...document.querySelectorAll('img')].find(i => i.getAttribute('src') === r.data_uri);
    if (!img) { out.figures[p] = null; continue; }
    const b = img.getBoundingClientRect();
    out.figures[p] = {shown_w: b.width, natural_w: img.naturalWidth, natural_h: img.naturalHeight,
                      left: b.left, right: b.right};
  }
  const d = document.createElement('pre'); d.id = 'probe'; d.textContent = JSON.stringify(out);
  document.body.appendChild(d);
});
</script>"""


def _chromium_run(page: Path, *args: str, size: str, budget_ms: int) -> str:
    """Headless Chromium on `page` at window `size` ("1400,900") with `args` (--dump-dom, --screenshot=...);
    returns its stdout."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tempfile.mkdtemp()}", f"--virtual-time-budget={budget_ms}", f"--window-size={size}"]
    return subprocess.run([_chromium(), *flags, *args, f"file://{page}"], capture_output=True, text=True,
                          timeout=300).stdout


@pytest.fixture(scope="module")
def probed(built, tmp_path_factory):
    """The DOM of one headless Chromium at 1400x900 that ran both probes (LOADED, PROBE) on the report: one browser
    start for the two tests that read it."""
    _chromium()  # skips when there is none
    page = tmp_path_factory.mktemp("chromium") / "probe.html"
    page.write_text(_inject(_inject(built[1], LOADED), PROBE))
    return _chromium_run(page, "--dump-dom", size="1400,900", budget_ms=60000)


def _probe_out(dom: str, pre_id: str):
    m = re.search(rf'<pre id="{pre_id}">(.*?)</pre>', dom, re.S)
    assert m, f"the report's scripts (probe {pre_id}) did not run in Chromium"
    return json.loads(html.unescape(m.group(1)))


def test_report_renders_in_chromium(built, probed, tmp_path):
    ws, text = built
    loaded = _probe_out(probed, "loaded")
    images = [p for p, r in _embedded(text, "results").items() if r["mime_type"].startswith("image/")]
    assert set(loaded) == set(images) and all(w > 0 for w in loaded.values()), loaded
    for cat in CATEGORIES:  # the navigation menu React rendered lists every category
        assert cat in re.sub(r"<script.*?</script>", "", probed, flags=re.S), f"{cat} not rendered"
    # screenshot with the CPU run's throughput figure open, for a person to look at
    shot_page = _inject(text, f"""<script>
window.addEventListener('load', () => setTimeout(() => app.setView({{navbarMode: "subcategory",
  category: "Throughput", subcategory: "{RUN}", content: "img",
  contentPath: results["results/{RUN}/plots/throughput.png"].data_uri}}), 300));
</script>""")
    (tmp_path / "shot.html").write_text(shot_page)
    shot = Path(os.environ.get("MOEBENCH_REPORT_SCREENSHOT", tmp_path / "report-screenshot.png"))
    shot.parent.mkdir(parents=True, exist_ok=True)
    _chromium_run(tmp_path / "shot.html", f"--screenshot={shot}", size="1400,1000", budget_ms=15000)
    img = Image.open(shot)
    assert img.size == (1400, 1000)
    assert len(set(img.convert("L").resize((140, 100)).get_flattened_data())) > 20, "screenshot is blank"


def test_front_page_and_figures_are_readable_at_1400x900(built, probed):
    """At 1400x900: the title is on screen at scroll 0; every figure is between 1:3 and 3:1, shown at >= 60% of its
    size, fully on screen, and its smallest text (from its sidecar) is >= 9 px as shown."""
    ws, text = built
    out = _probe_out(probed, "probe")
    front = out["front"]
    assert front and front["scroll"] == 0 and 0 <= front["top"] and front["bottom"] <= front["vh"], front
    assert out["figures"] and all(out["figures"].values()), out["figures"]
    for path, f in out["figures"].items():
        side = json.loads((ws / path).with_suffix(".json").read_text())["render"]
        scale = f["shown_w"] / f["natural_w"]
        assert 1 / 3 <= f["natural_w"] / f["natural_h"] <= 3, (path, f)
        assert scale >= 0.6 and f["left"] >= 0 and f["right"] <= out["vw"] + 0.5, (path, f)
        assert side["min_font_pt"] * side["dpi"] / 72 * scale >= 9, (path, side, scale)


ID = re.compile(r"\b([A-Za-z0-9][\w.-]*/(?:bench|compare|energy|offload|validate|sweep|comparison)/[\w.+-]+/"
                r"(?:d\d+|all)/[\w.-]+)")


def test_every_caption_id_is_in_its_runs_provenance(built):
    """Captions cite numbers by the ids provenance.json gives them: each one resolves there."""
    ws, text = built
    cited = {i for r in _embedded(text, "results").values() for i in ID.findall(_text(r["caption"]))}
    assert any(i.startswith(f"{RUN}/") for i in cited) and any(i.startswith("fx-gpu/") for i in cited)
    known: dict[str, set] = {}
    for nid in sorted(cited):
        run = nid.split("/", 1)[0]
        if run not in known:
            doc = json.loads((ws / "results" / run / "provenance.json").read_text())
            known[run] = {n["id"] for n in doc["numbers"]}
        assert nid in known[run], f"caption id {nid} is not in results/{run}/provenance.json"
