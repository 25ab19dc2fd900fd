"""README.md and docs/results.md quote the committed runs, and nothing else: their figures are rendered from each
run's provenance.json (moebench.report.readme), an edited figure fails, and the tables agree with the runs'
comparison.csv / metrics.csv read independently here (not through the renderer)."""
import csv
import json
import re
import subprocess

import pytest

from conftest import ROOT
from moebench.io import sha256_file
from moebench.report import readme

RUN = ROOT / "results" / "h100-gptoss20b"
RESULTS = ROOT / "docs" / "results.md"


@pytest.fixture(scope="module")
def rendered():
    return readme.render(ROOT)


@pytest.fixture(scope="module")
def pages(rendered):
    return rendered[0]


@pytest.fixture(scope="module")
def figures(rendered):
    return rendered[1]


def test_pages_are_their_rendering_from_provenance(pages, figures):
    assert readme.stale_pages(ROOT, pages, figures) == [], "run `make docs` (python -m moebench.report.readme)"


@pytest.mark.parametrize("page,old,new", [("README.md", "8.2x", "8.3x"), ("docs/results.md", "4.9", "5.9"),
                                          ("docs/results.md", "1.33x", "1.35x")])
def test_an_edited_figure_fails(pages, figures, tmp_path, page, old, new):
    """The hand-edits that once passed every test: the headline ratio, a router load, an H200-over-H100 ratio."""
    for p, text in {**pages, readme.FIGURES: readme.figures_json(figures)}.items():
        (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / p).write_text(text)
    text = pages[page]
    assert old in text, f"{old!r} is no longer in {page}: pick another figure for this test"
    (tmp_path / page).write_text(text.replace(old, new, 1))
    assert readme.stale_pages(tmp_path, pages, figures) == [page]


def test_figures_file_names_each_figures_ids_and_provenance(figures):
    assert len(figures) > 100
    numbers = {}
    for f in figures:
        for run, sha in f["provenance_sha256"].items():
            prov = ROOT / "results" / run / "provenance.json"
            assert sha == sha256_file(prov), run
            numbers.setdefault(run, {n["id"]: n for n in json.loads(prov.read_text())["numbers"]})
        for nid in f["ids"]:
            run = nid.split("/", 1)[0]
            assert nid.split("#")[0] in numbers[run] or "/verdict/" in nid, nid


def test_cross_run_ratios_have_their_provenance(figures):
    """An H200-over-H100 ratio rests on two runs' ids: figures.json records both ids and both provenance hashes."""
    cross = [f for f in figures if len(f["provenance_sha256"]) == 2 and " / " in f["expr"]]
    assert any(f["text"] == "1.33x" and f["ids"] == ["h200-gptoss20b/comparison/unsloth_bf16/all/tokens_per_s",
                                                     "h100-gptoss20b/comparison/unsloth_bf16/all/tokens_per_s"]
               for f in cross)


# Numbers a template may write literally: settings, versions, shapes and expectations, never a measured result.
LITERAL = {"3.11", "1.5x", "10–12x", "2e-4", "0.16.0", "2026.10.7", "1.0", "100", "3", "2", "20", "24", "48", "64", "16", "128",
           "512", "2048", "4096", "16384", "80", "1849", "4", "8", "1", "0"}
FIGURE = re.compile(r"(?<![\w.`/-])(\d+(?:\.\d+)?(?:–\d+(?:\.\d+)?)?(?:x|%| ?GB| ?s\b)?)(?![\w.`/-])")


@pytest.mark.parametrize("template", sorted(readme.PAGES))
def test_templates_type_no_results_figure(template):
    """Outside placeholders, code and tables of settings, a template holds no figure that is not a setting."""
    text = (ROOT / template).read_text()
    text = readme.PLACEHOLDER.sub(" ", text)
    text = re.sub(r"`[^`]*`", " ", text)  # code spans: paths, commands, config
    text = re.sub(r"\([^()]*\.(?:yaml|log|md|json)\)", " ", text)
    text = re.sub(r"^\|.*$", " ", text, flags=re.M)  # tables are rendered whole (the verdict legend names settings)
    bad = [m.group(1) for m in FIGURE.finditer(text)
           if m.group(1).strip() not in LITERAL and not re.fullmatch(r"\d+ ?(?:GB|s)", m.group(1).strip())
           or re.fullmatch(r"\d+\.\d+ ?(?:GB|s)", m.group(1).strip())]
    bad = [b for b in bad if b not in LITERAL]
    assert not bad, f"{template} types figures by hand: {bad}; write a placeholder with the provenance id instead"


def test_local_and_uncommitted_runs_are_refused(tmp_path):
    src = readme.Sources(ROOT)
    with pytest.raises(readme.RenderError, match="local run|no results/local"):
        src.run("local")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "results" / "x").mkdir(parents=True)
    (tmp_path / "results" / "x" / "provenance.json").write_text('{"numbers": []}')
    with pytest.raises(readme.RenderError, match="not committed"):
        readme.Sources(tmp_path).run("x")


def test_placeholder_errors_name_the_page_and_the_id(tmp_path):
    src = readme.Sources(ROOT)
    with pytest.raises(readme.RenderError, match=r"t\.md: \{\{h100-gptoss20b/bench/nope/d1/step_s\}\}: .* not in"):
        readme.render_text(src, "x {{h100-gptoss20b/bench/nope/d1/step_s}}", "t.md")
    with pytest.raises(readme.RenderError, match="no measured value"):
        readme.render_text(src, "{{h100-gptoss20b/bench/unsloth_4bit/d1/step_s}}", "t.md")


# ---- the tables against the runs' own files, read here without the renderer --------------------------------
def comparison(run="h100-gptoss20b"):
    return {r["arm"]: r for r in csv.DictReader((ROOT / "results" / run / "comparison.csv").open())}


def table_rows(heading: str, width: int, page=RESULTS, stop="\n## "):
    section = page.read_text().split(heading, 1)[1].split(stop, 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == width:
            yield cells


def test_h100_table_matches_comparison_csv():
    comp, seen = comparison(), 0
    for arm, step, tps, peak, four, _j, speed in table_rows("## GPT-OSS-20B on an H100", 7):
        if arm not in comp or step == "skipped":
            continue
        c = comp[arm]
        assert (f"{float(c['step_s']):.3f}", f"{float(c['tokens_per_s']):.0f}", f"{float(c['peak_alloc_gb']):.1f}",
                f"{float(c['expert_4bit_fraction']):.2f}", f"{float(c['speedup_vs_hf_bf16']):.2f}x") == \
            (step, tps, peak, four, speed), arm
        seen += 1
    assert seen == 4


def test_headline_ratio_is_the_verdicts():
    """The tier-shape run leads the README: its verdict word and each paired ratio are the verdict's own."""
    v = json.loads((ROOT / "results/h200-gptoss20b-tier/verdict.json").read_text())
    readme_text = " ".join((ROOT / "README.md").read_text().split())
    assert f"**{v['verdict']}**" in readme_text and v["n_draws"] == len(v["paired_ratios"])
    assert all(f"{r:.2f}x" in readme_text for r in v["paired_ratios"])
    # the older GPT-OSS run has no reference: the rule no longer substitutes e4b_4bit
    old = json.loads((RUN / "verdict.json").read_text())
    assert old["verdict"] == "NOT TESTABLE" and old["reference"] is None


def test_energy_and_draw_figures_are_in_the_metrics():
    rows = list(csv.DictReader((RUN / "metrics.csv").open()))
    text = " ".join(RESULTS.read_text().split())
    for arm in ("unsloth_bf16", "hf_bf16", "e4b_4bit"):
        for r in rows:
            if r["arm"] == arm and r["metric"] == "j_per_token" and r["stage"] == "energy" and "+" not in r["arm"]:
                assert f"{float(r['value']):.3f}" in text, (arm, r["draw"])
    steps = [float(r["value"]) for r in rows if r["arm"] == "unsloth_bf16" and r["metric"] == "step_s"]
    assert all(f"{s:.3f} s" in text for s in steps)
    ratios = [float(r["value"]) for r in rows if r["metric"] == "harness_over_bare"]
    found = re.findall(r"ratio was ([0-9.]+) in one draw and ([0-9.]+)", text)[0]
    assert sorted(f"{x:.2f}" for x in ratios) == sorted(found)


def test_two_tier_table_matches_each_runs_comparison():
    seen = set()
    for cells in table_rows("## Three families, two tiers", 7):
        if not (ROOT / "results" / cells[0] / "comparison.csv").exists():
            continue
        run, arm, step, tps, peak, four, speed = cells
        c = comparison(run)[arm]
        mark = " (degraded)" if c["status"] == "degraded" else ""  # a fallback path is never shown plain
        assert (f"{float(c['step_s']):.3f}{mark}", f"{float(c['tokens_per_s']):.0f}{mark}",
                f"{float(c['peak_alloc_gb']):.1f}{mark}", f"{float(c['expert_4bit_fraction']):.2f}{mark}",
                f"{float(c['speedup_vs_hf_bf16']):.2f}x{mark}") == (step, tps, peak, four, speed), (run, arm)
        seen.add(run)
    assert seen == {"h100-gptoss20b", "h200-gptoss20b", "h100-qwen3-30b-a3b", "h200-qwen3-30b-a3b", "h100-olmoe-1b-7b",
                    "h200-qwen3-30b-a3b-skew"}


def test_qwen_figures_are_the_runs_and_no_verdict():
    """One draw per arm on both cards: no verdict. The H100's 4-bit-vs-bf16 step times and the re-measured H200's
    unsloth_bf16-vs-hf_bf16 ratio are quoted as the runs hold them."""
    text = " ".join(RESULTS.read_text().split())
    for run in ("h100-qwen3-30b-a3b", "h200-qwen3-30b-a3b"):
        v = json.loads((ROOT / "results" / run / "verdict.json").read_text())
        assert v["speed_verdict"] == "NOT TESTABLE", run
    h100, h200 = comparison("h100-qwen3-30b-a3b"), comparison("h200-qwen3-30b-a3b")
    assert (f"ran *faster* than its bf16 Split LoRA ({float(h100['unsloth_4bit']['step_s']):.3f} vs "
            f"{float(h100['unsloth_bf16']['step_s']):.3f} s/step)") in text
    assert h200["unsloth_bf16"]["status"] == "measured" and h200["unsloth_4bit"]["status"] == "degraded"
    assert (f"unsloth_bf16 ({float(h200['unsloth_bf16']['step_s']):.3f} s/step, no fallback) runs at "
            f"{float(h200['unsloth_bf16']['speedup_vs_hf_bf16'].rstrip('x')):.2f}x the speed of") in text


def _metric(run, arm, metric):
    rows = csv.DictReader((ROOT / "results" / run / "metrics.csv").open())
    return next(float(r["value"]) for r in rows if r["arm"] == arm and r["metric"] == metric and r["stage"] == "bench")


def _shown(run, arm, metric, spec):
    """A bench figure as the page shows it: a degraded row carries its mark."""
    rows = csv.DictReader((ROOT / "results" / run / "metrics.csv").open())
    r = next(r for r in rows if r["arm"] == arm and r["metric"] == metric and r["stage"] == "bench")
    return format(float(r["value"]), spec) + (" (degraded)" if r["status"] == "degraded" else "")


def test_tier_ratios_and_skew_figures_are_the_runs():
    text = " ".join(RESULTS.read_text().split())
    med = {run: comparison(run) for run in ("h100-qwen3-30b-a3b", "h200-qwen3-30b-a3b")}
    ratio = {arm: float(med["h200-qwen3-30b-a3b"][arm]["tokens_per_s"]) / float(med["h100-qwen3-30b-a3b"][arm]
                                                                                 ["tokens_per_s"])
             for arm in ("unsloth_4bit", "unsloth_bf16")}
    mark = {arm: " (degraded)" if med["h200-qwen3-30b-a3b"][arm]["status"] == "degraded" else "" for arm in ratio}
    assert f"unsloth_bf16 {ratio['unsloth_bf16']:.2f}x{mark['unsloth_bf16']} and unsloth_4bit " \
           f"{ratio['unsloth_4bit']:.2f}x{mark['unsloth_4bit']}" in text
    plain, skew = "h200-qwen3-30b-a3b", "h200-qwen3-30b-a3b-skew"
    assert f"in warm-up was max/mean {_metric(skew, 'hf_bf16', 'router_max_over_mean'):.1f}, with " \
           f"{_metric(skew, 'hf_bf16', 'router_unused_experts'):.0f} experts unused" in text
    assert f"load time, {_shown(plain, 'unsloth_bf16', 'load_s', '.0f')} s), and the first step still " \
           f"{_shown(plain, 'unsloth_bf16', 'first_step_s', '.0f')} s (compile)" in text


def test_zeus_range_is_the_rows():
    """The Zeus-vs-NVML sentence gives the smallest and largest committed difference, signs included."""
    vals = [float(r["value"]) for p in (ROOT / "results").glob("*/metrics.csv") if not p.parent.name.startswith("local")
            for r in csv.DictReader(p.open()) if r["metric"] == "zeus_vs_ours_rel_diff" and r["status"] == "measured"]
    text = " ".join(RESULTS.read_text().split())
    lo, hi = (f"{v:.2%}".replace("-", "−") for v in (min(vals), max(vals)))
    assert f"reads {lo} to {hi}" in text


@pytest.mark.parametrize("heading,run,arms", [
    ("### Training validation (H100", "h100-gptoss20b", {"unsloth_bf16", "hf_bf16", "e4b_4bit"}),
    ("### Training validation of the verdict pair", "h200-gptoss20b-tier", {"unsloth_bf16", "unsloth_4bit"})])
def test_validation_table_matches_each_arms_validate_rows(heading, run, arms):
    run = ROOT / "results" / run
    training = json.loads((run / "verdict.json").read_text())["training"]
    seen = set()
    for cells in table_rows(heading, 8, stop="\n#"):
        if cells[0] not in training:
            continue
        arm, steps, rows, held, drop, grads, reload, peak = cells
        m = {r["metric"]: r["value"] for r in csv.DictReader((run / "validate" / arm / "metrics.csv").open())}
        assert steps == m["optimizer_steps"] and rows == m["packed_train_sequences"], arm
        before, after = held.split(" → ")
        assert before == f"{float(m['heldout_loss_before']):.2f}", arm
        assert after == f"{float(m['heldout_loss_after']):.3g}", arm
        assert drop == f"−{float(m['gate_loss_drop_value']):.1%}", arm
        n = int(float(m["expert_lora_tensors"]))
        assert grads == f"{round(float(m['gate_expert_grads_value']) * n)} / {n}", arm
        assert reload == (f"{float(m['reload_logits_max_abs_diff']):.3g} "
                          f"({float(m['reload_trained_autocast_max_abs_diff']):.3g})"), arm
        assert peak == f"{float(m['peak_alloc_gb']):.1f}", arm
        assert training[arm]["result"] == "PASS", arm
        seen.add(arm)
    assert seen == arms


def test_olmoe_moe_outside_figures_are_the_runs():
    run = ROOT / "results" / "h100-olmoe-1b-7b-moe-outside"
    c = comparison(run.name)["unsloth_bf16"]
    rows = {r["metric"]: r["value"] for r in csv.DictReader((run / "metrics.csv").open()) if r["arm"] == "unsloth_bf16"}
    text = " ".join(RESULTS.read_text().split())
    assert f"{float(rows['first_step_s']):.1f} s for its first step" in text
    assert f"median {float(c['step_s']):.3f} s/step ({float(c['tokens_per_s']):.0f} tokens/s, peak " \
           f"{float(c['peak_alloc_gb']):.1f} GB" in text
    assert json.loads((run / "verdict.json").read_text())["verdict"] == "NOT TESTABLE"
    env = json.loads((run / "arms" / "unsloth_bf16" / "draw1" / "env.json").read_text())
    assert env["env"]["UNSLOTH_BLOCK_MOE"] == "outside"


# ---- the figures file's own hash chain
def test_figures_chain_adds_a_revision_only_when_a_figure_changes(tmp_path, figures):
    one = readme.commit_figures(tmp_path, figures)
    again = readme.commit_figures(tmp_path, figures)
    assert again == one and json.loads(one)["revision"] == 1 and json.loads(one)["previous_sha256"] is None
    changed = [dict(figures[0], value=figures[0]["value"] * 2)] + figures[1:]
    two = json.loads(readme.commit_figures(tmp_path, changed))
    hist = tmp_path / "audits/.ots-history" / readme.FIGURES_CHAIN
    assert two["revision"] == 2 and two["previous_sha256"] == sha256_file(hist / f"{two['previous_sha256']}.json")
    assert (hist / "HEAD").read_text().strip() == sha256_file(hist / f"{(hist / 'HEAD').read_text().strip()}.json")


def test_committed_figures_file_is_its_chains_head():
    """HEAD names docs/figures.json, and every revision back to the first is committed (a fresh clone audits it)."""
    hist = ROOT / "audits/.ots-history" / readme.FIGURES_CHAIN
    sha = (hist / "HEAD").read_text().strip()
    assert sha == sha256_file(ROOT / readme.FIGURES), "run `make docs`"
    while sha:
        rev = hist / f"{sha}.json"
        assert readme._tracked(ROOT, rev), f"{rev} is not committed: `git add {hist.relative_to(ROOT)}`"
        sha = json.loads(rev.read_text())["previous_sha256"]
