"""Provenance, hash chain, offline stamp and audit on a small fake run (tests/ots_fixture/fakerun.py): every number
with a stable id and its log's sha256, no growth on an unchanged rerun, a new revision naming the old one, and an
audit that catches each kind of tampering by name. The Snakemake rules run through a harness Snakefile."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ots_fixture import fakerun as fr  # noqa: E402

from conftest import BACKGROUND_NICE, background, snakemake  # noqa: E402

from moebench.metrics import read_rows  # noqa: E402
from moebench.provenance import number_id, resolve_source  # noqa: E402

RUN = fr.RUN
R = f"results/{RUN}"
CLOSED = "http://127.0.0.1:9"  # discard port: nothing listens, connection refused at once


def sha(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@pytest.fixture
def run(tmp_path):
    run_dir = fr.make_run(tmp_path)
    return tmp_path, run_dir


def provenance(root, **kw):
    return fr.moebench(root, "provenance", *fr.provenance_args(root / R), **kw)


def audit(root, *extra):
    r = fr.moebench(root, "audit", "--date", "2026-01-03", "--no-calendars", *extra)
    report = sorted((root / "audits").glob("AUDIT-2026-01-03*.md"))
    return r, (report[-1].read_text() if report else "")


def hist(root) -> Path:
    return root / "audits" / ".ots-history" / RUN


def revisions(root) -> list[str]:
    return sorted(p.name for p in hist(root).glob("*.json") if len(p.stem) == 64)


def test_every_number_with_stable_id_source_hash_inputs_and_environment(run):
    root, run_dir = run
    r = provenance(root)
    assert r.returncode == 0, r.stderr
    doc = fr.read(run_dir / "provenance.json")
    by_id = {n["id"]: n for n in doc["numbers"]}
    rows = read_rows(run_dir / "metrics.csv")
    assert len(rows) > 40
    for row in rows:
        n = by_id[number_id(RUN, row.stage, row.arm, row.draw, row.metric)]
        assert (n["value"], n["unit"], n["status"], n["reason"], n["n"]) == \
            (row.value, row.unit, row.status, row.reason, row.n)
        assert n["source_sha256"] == sha(resolve_source(row.source, run_dir, root))
        assert n["status"] == "measured" or (n["value"] is None and n["reason"])
    assert by_id[f"{RUN}/bench/unsloth_bf16/d1/step_s"]["value"] == 0.30
    assert by_id[f"{RUN}/bench/hf_bnb4/d2/step_s"]["status"] == "skipped"
    assert by_id[f"{RUN}/compare/unsloth_bf16/all/speedup_vs_unsloth_4bit"]["value"] == pytest.approx(2.0)
    assert by_id[f"{RUN}/comparison/hf_bf16/all/step_s"]["value"] == pytest.approx(0.92)
    inp = doc["inputs"]
    assert inp["config"]["sha256"] == sha(run_dir / "config.yaml") and inp["seeds"]["seed"] == 42
    assert inp["data"]["files"]["train.jsonl"] == sha(run_dir / "data" / "train.jsonl")
    assert inp["model"]["config_sha256"] == "ab" * 32
    assert inp["verdict"]["content"] == fr.read(run_dir / "verdict.json")  # the verdict as it was judged
    assert inp["verdict"]["sha256"] == sha(run_dir / "verdict.json")
    env = doc["environment"]
    assert env["tier"]["gpu"]["driver"] == "570.86.15" and env["tier"]["host"]["hostname"] == "node7"
    assert env["arms"]["hf_bf16/draw1"]["packages"]["torch"] == "2.9.0"
    assert env["provenance_tools"]["packages"]["opentimestamps-client"] == "0.7.2"
    assert doc["times"] == {"started": "2026-01-02T10:01:00+00:00", "ended": "2026-01-02T10:02:30+00:00"}
    assert set(doc["project"]) >= {"commit", "dirty"}
    assert (doc["revision"], doc["previous_sha256"]) == (1, None)
    md = (run_dir / "PROVENANCE.md").read_text()
    assert all(f"`{i}`" in md for i in by_id) and sha(run_dir / "provenance.json") in md


def test_unchanged_rerun_rewrites_the_same_bytes_and_does_not_grow_the_chain(run):
    root, run_dir = run
    assert provenance(root).returncode == 0
    first = (run_dir / "provenance.json").read_bytes()
    (run_dir / "provenance.json").unlink()  # Snakemake removes outputs before rerunning a job
    r = provenance(root)
    assert r.returncode == 0 and "chain not grown" in r.stderr
    assert (run_dir / "provenance.json").read_bytes() == first
    assert revisions(root) == [f"{sha(run_dir / 'provenance.json')}.json"]


def test_changed_number_makes_a_revision_that_names_the_previous_one(run):
    root, run_dir = run
    assert provenance(root).returncode == 0
    sha1 = sha(run_dir / "provenance.json")
    metrics = run_dir / "metrics.csv"
    metrics.write_text(metrics.read_text().replace("0.3,s,6", "0.305,s,6"))  # unsloth_bf16 d1 step_s
    log = run_dir / "arms/unsloth_bf16/draw1/run.log"
    log.write_text(log.read_text().replace('"value": 0.3}', '"value": 0.305}'))
    assert provenance(root).returncode == 0
    doc = fr.read(run_dir / "provenance.json")
    assert (doc["revision"], doc["previous_sha256"]) == (2, sha1)
    assert (hist(root) / f"{sha1}.json").is_file()  # the old revision is kept
    assert (hist(root) / "HEAD").read_text().strip() == sha(run_dir / "provenance.json")


def test_audit_passes_on_an_honest_run_and_writes_its_findings(run):
    root, run_dir = run
    assert provenance(root).returncode == 0
    r, report = audit(root)
    assert r.returncode == 5, r.stderr  # UNSTAMPED: everything checks out, no proof yet (offline)
    assert r.stdout.startswith("AUDIT UNSTAMPED: ") and "**UNSTAMPED**" in report and "hash chain intact" in report
    assert "has no OpenTimestamps proof" in report
    doc = fr.read(run_dir / "provenance.json")
    derived = sum(n["stage"] in ("comparison", "compare") for n in doc["numbers"])
    # 3 measured arms x 2 draws x 6 rows + 2 skipped rows + 3 validate + 2 offload rows; 6 draws' step_s
    # recomputed from their per-step lines and from steps.csv; every comparison cell and speedup recomputed
    assert (f"re-derived from logs: 43; stage logs scanned: 10; step medians and spreads recomputed: 12; "
            f"derived recomputed: {derived};") in report


def _edit_json_value(path: Path, nid: str, value):
    doc = json.loads(path.read_text())
    next(n for n in doc["numbers"] if n["id"] == nid)["value"] = value
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def _tamper_provenance(root, run_dir):
    _edit_json_value(run_dir / "provenance.json", f"{RUN}/bench/unsloth_bf16/d1/step_s", 0.25)
    return ["is not the chain's newest revision", "changed after it was written",
            f"number {RUN}/bench/unsloth_bf16/d1/step_s: does not match its source log"]


def _tamper_log(root, run_dir):
    log = run_dir / "arms/hf_bf16/draw2/run.log"
    log.write_text(log.read_text().replace('"value": 0.94}', '"value": 0.84}'))
    return [f"{R}/arms/hf_bf16/draw2/run.log changed since the provenance was written",
            f"number {RUN}/bench/hf_bf16/d2/step_s: does not match its source log"]


def _rebuild(root, run_dir, edit_metrics=None):
    """An honest-looking new revision: metrics.csv edited as given, then the provenance rebuilt (chain intact)."""
    if edit_metrics:
        m = run_dir / "metrics.csv"
        m.write_text("".join(l for l in m.read_text().splitlines(True) if not edit_metrics(l)))
    assert provenance(root).returncode == 0


def _dropped_validate_rows(root, run_dir):
    _rebuild(root, run_dir, lambda line: ",validate," in line)
    return [f"{R}/validate/hf_bf16/run.log: logged number {RUN}/validate/hf_bf16/all/loss_last is missing from "
            "the provenance"]


def _dropped_offload_run(root, run_dir):
    shutil.rmtree(run_dir / "offload")
    _rebuild(root, run_dir, lambda line: ",offload," in line)
    return [f"{R}/offload/hf_bf16/plain/run.log is missing: the run's config and tier plan say this stage ran"]


def _edited_step_line(root, run_dir):
    """A per-step time changed in the log and steps.csv, the provenance rebuilt: the median no longer follows."""
    log = run_dir / "arms/unsloth_4bit/draw1/run.log"
    log.write_text(log.read_text().replace("timed step 3/6: 0.6039 s", "timed step 3/6: 0.6139 s"))
    steps = log.with_name("steps.csv")
    steps.write_text(steps.read_text().replace("3,0.6039,", "3,0.6139,"))
    _rebuild(root, run_dir)
    return [f"number {RUN}/bench/unsloth_4bit/d1/step_s = 0.61: recomputed from the per-step lines of "
            f"{R}/arms/unsloth_4bit/draw1/run.log: median 0.615",
            f"{RUN}/bench/unsloth_4bit/d1/step_s = 0.61: recomputed from the steps.csv"]


def _edited_comparison(root, run_dir):
    """comparison.csv given another median and the provenance rebuilt from it: the audit's own arithmetic differs."""
    c = run_dir / "comparison.csv"
    c.write_text(c.read_text().replace(",0.9199999999999999,", ",0.8199999999999999,", 1))
    _rebuild(root, run_dir)
    return [f"derived number {RUN}/comparison/hf_bf16/all/step_s = 0.82: recomputed from the checked rows it is "
            "0.9199999999999999"]


def _extra_log_row(root, run_dir):
    log = run_dir / "arms/hf_bf16/draw1/run.log"
    row = json.loads(log.read_text().split("MOEBENCH_ROW ")[1].splitlines()[0])
    row["metric"] = "secret_s"
    log.write_text(log.read_text() + f"x bench INFO MOEBENCH_ROW {json.dumps(row)}\n")
    return [f"logged number {RUN}/bench/hf_bf16/d1/secret_s is missing from the provenance"]


def _malformed_log_line(root, run_dir):
    log = run_dir / "arms/unsloth_4bit/draw1/run.log"
    log.write_text(log.read_text() + "x bench INFO MOEBENCH_ROW {not json\n")
    n = len(log.read_text().splitlines())
    return [f"{R}/arms/unsloth_4bit/draw1/run.log:{n}: malformed MOEBENCH_ROW line"]


def _two_revisions(root, run_dir):
    metrics = run_dir / "metrics.csv"
    metrics.write_text(metrics.read_text().replace("0.3,s,6", "0.305,s,6"))
    log = run_dir / "arms/unsloth_bf16/draw1/run.log"
    log.write_text(log.read_text().replace('"value": 0.3}', '"value": 0.305}'))
    assert provenance(root).returncode == 0
    return fr.read(run_dir / "provenance.json")["previous_sha256"]


def _delete_old_revision(root, run_dir):
    old = _two_revisions(root, run_dir)
    (hist(root) / f"{old}.json").unlink()
    return [f"chain broken at revision 1 ({old[:16]})", "is missing"]


def _edit_old_revision(root, run_dir):
    old = _two_revisions(root, run_dir)
    p = hist(root) / f"{old}.json"
    p.write_text(p.read_text().replace("0.3,", "0.31,").replace('"value": 0.3\n', '"value": 0.31\n'))
    return [f"chain broken at revision 1 ({old[:16]})", "was changed"]


def _stamp_record_claims_complete(root, run_dir):
    """provenance_stamp.json saying more than the proof holds (here: no proof at all)."""
    (run_dir / "provenance_stamp.json").write_text(json.dumps(
        {"status": "complete", "provenance_sha256": sha(run_dir / "provenance.json")}))
    return [f"{R}/provenance_stamp.json says 'complete' but the proof is missing"]


@pytest.mark.parametrize("tamper", [_tamper_provenance, _tamper_log, _extra_log_row, _malformed_log_line,
                                    _delete_old_revision, _edit_old_revision, _dropped_validate_rows,
                                    _dropped_offload_run, _edited_step_line, _edited_comparison,
                                    _stamp_record_claims_complete])
def test_audit_names_each_kind_of_tampering(run, tamper):
    root, run_dir = run
    assert provenance(root).returncode == 0
    expected = tamper(root, run_dir)
    r, report = audit(root)
    assert r.returncode == 1 and r.stdout.startswith("AUDIT FAILED: ")
    for text in expected:
        assert text in r.stderr and text in report, (text, r.stderr[-3000:])


def test_bad_input_is_a_clear_message_and_loses_nothing(run):
    root, run_dir = run
    assert provenance(root).returncode == 0
    before = (run_dir / "provenance.json").read_bytes()
    (run_dir / "metrics.csv").rename(run_dir / "metrics.csv.bak")
    r = provenance(root)
    assert r.returncode == 2 and f"missing input {R}/metrics.csv" in r.stderr
    (run_dir / "metrics.csv").write_text("not,a,metrics,table\n1,2,3,4\n")
    r = provenance(root)
    assert r.returncode == 2 and "not a readable metrics table" in r.stderr
    shutil.move(run_dir / "metrics.csv.bak", run_dir / "metrics.csv")
    (run_dir / "arms/hf_bf16/draw1/run.log").rename(run_dir / "run.log.moved")
    r = provenance(root)
    assert r.returncode == 2 and f"{RUN}/bench/hf_bf16/d1/step_s (source '{R}/arms/hf_bf16/draw1/run.log')" in r.stderr
    (run_dir / "run.log.moved").rename(run_dir / "arms/hf_bf16/draw1/run.log")
    (hist(root) / "HEAD").write_text("0" * 64 + "\n")  # history names a revision that is gone
    (run_dir / "metrics.csv").write_text((run_dir / "metrics.csv").read_text())
    r = provenance(root)
    assert r.returncode == 2 and f"revision {'0' * 64}" in r.stderr and "is missing" in r.stderr
    assert (run_dir / "provenance.json").read_bytes() == before  # nothing lost or overwritten
    r = fr.moebench(root, "audit", "--results", "nowhere")
    assert r.returncode == 2 and "no run with a provenance.json under nowhere" in r.stderr


def test_stamp_offline_finishes_quickly_and_says_why(run):
    root, run_dir = run
    assert provenance(root).returncode == 0
    stale = run_dir / "provenance.json.ots"
    stale.write_bytes(b"not a proof")  # a leftover that must not be lost nor mistaken for a proof
    t = time.monotonic()
    r = fr.moebench(root, "stamp", "stamp", "--provenance", f"{R}/provenance.json", "--out",
                    f"{R}/provenance_stamp.json", "-c", CLOSED, "-c", "http://127.0.0.1:1", "--timeout", "2")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t < 20
    rec = fr.read(run_dir / "provenance_stamp.json")
    assert rec["status"] == "unreachable" and rec["ots"] is None
    assert "Connection refused" in rec["reason"] and "need at least 2 attestations" in rec["reason"]
    assert rec["check"].startswith("NOT timestamped") and "ots_upgrade" in rec["check"]
    assert rec["provenance_sha256"] == sha(run_dir / "provenance.json")
    assert (hist(root) / f"{rec['provenance_sha256']}.stamp.json").is_file()
    assert not stale.exists() and list(hist(root).glob("unreadable-*.ots"))  # kept in the history
    r = fr.moebench(root, "stamp", "stamp", "--provenance", f"{R}/nope.json", "--out", f"{R}/x.json")
    assert r.returncode == 1 and "does not exist" in r.stderr and not (run_dir / "x.json").exists()


@background("provenance_rules")
def provenance_rules(tmp_path_factory):
    """The rules as a user runs them, beside the other tests (nothing else needs them): the harness's Snakemakes in
    order on a fake run, with what each left behind. Returns (root, {step: (Ran, what it left)})."""
    root = tmp_path_factory.mktemp("rules")
    run_dir = fr.make_run(root)
    cfg = run_dir / "config.yaml"
    cfg.write_text(cfg.read_text() + f"provenance:\n  calendars: [{CLOSED}]\n  timeout_s: 2\n")
    fr.snakemake_harness(root)  # its files; its Snakemakes run here, niced
    level = root / "audits" / "level.txt"

    def sm(*args):
        return snakemake(root, "--cores", "1", *args, env=fr.env(root), timeout=120, nice=BACKGROUND_NICE)

    seen = {"first": (sm(), fr.read(run_dir / "provenance_stamp.json")["status"]
                      if (run_dir / "provenance_stamp.json").is_file() else None)}
    seen["again"] = (sm(), None)
    seen["forced"] = (sm("--forcerun", "provenance"), len(revisions(root)))  # nothing changed: same bytes
    seen["audit"] = (sm("audit"), level.read_text() if level.is_file() else "")
    log = run_dir / "arms/hf_bf16/draw1/run.log"
    log.write_text(log.read_text() + "x bench INFO timed step 7/6: 1.0 s\n")  # a tamper: FAILED fails the rule
    seen["tampered"] = (sm("audit"), level.read_text() if level.is_file() else "")
    seen["lint"] = (sm("--lint"), None)
    return root, seen


def test_snakemake_rules_run_rerun_as_noop_and_lint_clean(provenance_rules):
    root, seen = provenance_rules
    run_dir = root / R
    r, status = seen["first"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert status == "unreachable"
    assert (run_dir / "logs" / "stamp.log").is_file() and (run_dir / "logs" / "provenance.log").is_file()
    r, _ = seen["again"]
    assert r.returncode == 0 and "Nothing to be done" in r.stderr
    r, n_revisions = seen["forced"]  # rerun with nothing changed: same bytes, chain not grown
    assert r.returncode == 0 and n_revisions == 1
    r, level = seen["audit"]  # run by name: no proof offline is UNSTAMPED, said and written, and not a failure
    assert r.returncode == 0, r.stderr[-3000:]
    assert "AUDIT UNSTAMPED: " in r.stdout + r.stderr
    assert level.startswith("UNSTAMPED\n")
    r, level = seen["tampered"]
    assert r.returncode != 0 and level.startswith("FAILED\n")
    r, _ = seen["lint"]
    assert r.returncode == 0 and "Congratulations" in r.stdout + r.stderr, r.stdout + r.stderr


def test_draw_degraded_afterwards_by_its_console_checks_out_only_with_that_line(run):
    """aggregate marks a draw logged `measured` as `degraded` when its console.log holds a declared fallback line:
    the audit accepts the changed status only while that line is in the console.log."""
    import yaml

    root, run_dir = run
    console = run_dir / "arms/unsloth_bf16/draw2/console.log"
    console.write_text("Unsloth: Falling back to the slow MoE path\n")
    cfg_path = run_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["degraded_patterns"] = {"unsloth_bf16": ["Falling back to the slow"]}
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=True))
    fr.aggregate_run(root, run_dir)
    assert provenance(root).returncode == 0
    step = {n["id"]: n for n in fr.read(run_dir / "provenance.json")["numbers"]}[f"{RUN}/bench/unsloth_bf16/d2/step_s"]
    assert step["status"] == "degraded" and step["reason"].startswith("console: Unsloth: Falling back")
    r, _ = audit(root)
    assert r.returncode == 5, r.stderr[-2000:]
    console.write_text("all fast\n")
    r, _ = audit(root)
    assert r.returncode == 1 and "status: provenance 'degraded' vs log 'measured'" in r.stderr
