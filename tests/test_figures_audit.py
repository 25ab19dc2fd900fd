"""docs/figures.json under audit: its own hash chain, and every figure (cross-run ratios included) recomputed from
the provenance ids it names. Each way a figure can go wrong is a FAIL."""
import json

import pytest

from moebench.audit.figures import audit_figures
from moebench.chain import settings
from moebench.io import sha256_file
from moebench.report import readme


def _run(root, run, values, verdict=None):
    d = root / "results" / run
    d.mkdir(parents=True)
    doc = {"run": run, "numbers": [{"id": f"{run}/comparison/{arm}/all/step_s", "status": st, "value": v}
                                   for arm, (st, v) in values.items()], "inputs": {}}
    if verdict is not None:
        (d / "verdict.json").write_text(json.dumps(verdict))
        doc["inputs"]["verdict"] = {"sha256": sha256_file(d / "verdict.json")}
    (d / "provenance.json").write_text(json.dumps(doc))
    return sha256_file(d / "provenance.json")


@pytest.fixture
def tree(tmp_path):
    a = _run(tmp_path, "h100", {"bf16": ("measured", 2.0), "q4": ("measured", 5.0)},
             verdict={"speedup": 2.5, "interval": [2.4, 2.6]})
    b = _run(tmp_path, "h200", {"bf16": ("measured", 1.5), "q4": ("skipped", None)})
    figures = [
        {"expr": "h100/comparison/bf16/all/step_s / h200/comparison/bf16/all/step_s | .2f x",
         "ids": ["h100/comparison/bf16/all/step_s", "h200/comparison/bf16/all/step_s"],
         "provenance_sha256": {"h100": a, "h200": b}, "text": "1.33x", "value": 2.0 / 1.5},
        {"expr": "verdict h100 interval.1 | .2f", "ids": ["h100/verdict/interval.1"],
         "provenance_sha256": {"h100": a}, "text": "2.60", "value": 2.6},
        {"expr": "range h100/comparison/*/all/step_s | .1f",
         "ids": ["h100/comparison/bf16/all/step_s", "h100/comparison/q4/all/step_s"],
         "provenance_sha256": {"h100": a}, "text": "2.0–5.0", "value": [2.0, 5.0]},
    ]
    return tmp_path, figures


def _audit(root, figures=None, edit=None):
    if figures is not None:
        (root / readme.FIGURES).parent.mkdir(parents=True, exist_ok=True)
        (root / readme.FIGURES).write_text(readme.commit_figures(root, figures))
    if edit:
        p = root / readme.FIGURES
        p.write_text(edit(p.read_text()))
    s = settings(None, history=str(root / "audits/.ots-history"))
    return audit_figures(root / readme.FIGURES, root / "results", s, check_calendars=False)


def test_figures_that_check_out_are_unstamped_offline(tree):
    F, info = _audit(*tree)
    assert not F.failed, F.failed
    assert info["level"] == "UNSTAMPED" and info["revision"] == 1


def test_a_hand_edited_cross_run_ratio_fails(tree):
    root, figures = tree
    figures[0]["value"] = 1.40  # the value recorded beside a text someone retyped
    F, _ = _audit(root, figures)
    assert any("its provenance gives" in m for m in F.failed), F.failed


def test_an_edit_outside_the_chain_fails(tree):
    F, _ = _audit(*tree, edit=lambda t: t.replace('"text": "1.33x"', '"text": "1.35x"'))
    assert any("not the chain's newest revision" in m for m in F.failed), F.failed


def test_a_figure_on_an_older_provenance_is_stale(tree):
    root, figures = tree
    _audit(root, figures)
    prov = root / "results/h200/provenance.json"
    prov.write_text(prov.read_text().replace("1.5", "1.6"))
    F, _ = _audit(root)
    assert any("is stale" in m for m in F.failed), F.failed


def test_a_range_that_leaves_out_a_matching_id_fails(tree):
    root, figures = tree
    figures[2]["ids"] = figures[2]["ids"][:1]
    figures[2]["value"] = [2.0, 2.0]
    F, _ = _audit(root, figures)
    assert any("globs match" in m for m in F.failed), F.failed


def test_a_verdict_field_is_read_from_the_recorded_verdict(tree):
    root, figures = tree
    _audit(root, figures)
    (root / "results/h100/verdict.json").write_text(json.dumps({"speedup": 9.9, "interval": [9, 10]}))
    F, _ = _audit(root)
    assert any("not the one its provenance records" in m for m in F.failed), F.failed
