"""End to end with the REAL `ots` client and no network: a local OpenTimestamps calendar and a fake bitcoind
(tests/ots_fixture/servers.py) on ephemeral ports. The provenance is stamped (`ots stamp -c URL`), stays pending until
the calendar puts it in a made-up block, is upgraded (`ots -l URL upgrade`), then `ots --bitcoin-node ... verify`
passes on it and fails on a copy with one number changed. A calendar that never answers costs a bounded time."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ots_fixture import fakerun as fr  # noqa: E402
from ots_fixture.servers import Calendar, Chain, Fixture  # noqa: E402

R = f"results/{fr.RUN}"
OTS = str(Path(sys.executable).parent / "ots")


@pytest.fixture
def run(tmp_path):
    run_dir = fr.make_run(tmp_path)
    assert fr.moebench(tmp_path, "provenance", *fr.provenance_args(run_dir)).returncode == 0
    return tmp_path, run_dir


def ots(root, *args, timeout=60):
    return subprocess.run([OTS, "--no-cache", *args], cwd=root, env=fr.env(root), capture_output=True, text=True,
                          timeout=timeout)


def stamp(root, action, *args):
    return fr.moebench(root, "stamp", action, "--provenance", f"{R}/provenance.json", "--out",
                       f"{R}/provenance_stamp.json", "--timeout", "3", *args, timeout=90)


def test_stamp_upgrade_verify_and_tamper_detection(run):
    root, run_dir = run
    with Fixture() as fx:
        cal = ["-c", fx.calendar.url, "-m", "1", "--cache", str(root / ".cache" / "ots")]
        r = stamp(root, "stamp", *cal)
        assert r.returncode == 0, r.stderr
        rec = fr.read(run_dir / "provenance_stamp.json")
        assert rec["status"] == "pending" and rec["pending_calendars"] == [fx.calendar.url]
        proof = run_dir / "provenance.json.ots"
        assert proof.is_file() and (root / rec["history_ots"]).read_bytes() == proof.read_bytes()
        assert "PendingAttestation('%s')" % fx.calendar.url in ots(root, "info", str(proof)).stdout

        # not yet in a block: the calendar says pending, the proof is unchanged, verify cannot pass
        r = stamp(root, "upgrade", *cal)
        assert r.returncode == 0 and fr.read(run_dir / "provenance_stamp.json")["status"] == "pending"
        assert "Pending confirmation in Bitcoin blockchain" in (r.stderr)
        r, report = _audit(root, "--timeout", "3", "-l", fx.calendar.url)
        assert r.returncode == 0, r.stderr  # pending is a warning; the calendar answered
        assert f"still pending at calendar {fx.calendar.url}" in report
        assert ots(root, "-l", fx.calendar.url, "--bitcoin-node", fx.bitcoind.url, "verify", str(proof)).returncode == 1

        height = fx.calendar.mine()
        r = stamp(root, "upgrade", *cal)
        assert r.returncode == 0, r.stderr
        rec = fr.read(run_dir / "provenance_stamp.json")
        assert rec["status"] == "complete" and rec["bitcoin"][0]["height"] == height
        assert rec["check"].startswith(f"Timestamped in Bitcoin block {height}")

        # what a reader runs (README): the real client against the node
        r = ots(root, "-l", fx.calendar.url, "--bitcoin-node", fx.bitcoind.url, "verify", f"{R}/provenance.json.ots")
        assert r.returncode == 0, r.stderr
        assert f"Success! Bitcoin block {height} attests existence" in r.stderr

        r, report = _audit(root, "--bitcoin-node", fx.bitcoind.url)
        assert r.returncode == 0, r.stderr
        assert "`ots verify` passed against http://***@127.0.0.1" in report and "| complete (block" in report
        assert fx.bitcoind.password not in report

        # one number changed: the proof no longer matches, for `ots verify` and for the audit
        doc = json.loads((run_dir / "provenance.json").read_text())
        doc["numbers"][0]["value"] = doc["numbers"][0]["value"] * 0.9
        tampered = run_dir / "provenance.tampered.json"
        tampered.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        r = ots(root, "--bitcoin-node", fx.bitcoind.url, "verify", "-f", str(tampered), str(proof))
        assert r.returncode == 1 and "File does not match original!" in r.stderr
        shutil.copy(tampered, run_dir / "provenance.json")
        r, report = _audit(root, "--bitcoin-node", fx.bitcoind.url)
        assert r.returncode == 1
        assert f"{R}/provenance.json.ots proves a different file" in r.stderr
        assert "changed after it was written" in r.stderr


def test_new_revision_is_stamped_and_old_proof_kept(run):
    root, run_dir = run
    with Fixture() as fx:
        cal = ["-c", fx.calendar.url, "-m", "1", "--cache", str(root / ".cache" / "ots")]
        assert stamp(root, "stamp", *cal).returncode == 0
        first = fr.read(run_dir / "provenance_stamp.json")["provenance_sha256"]
        r = stamp(root, "stamp", *cal)  # unchanged: the same proof, no second submission
        assert r.returncode == 0 and fx.calendar.submissions == 1
        log = run_dir / "arms/hf_bf16/draw1/run.log"
        log.write_text(log.read_text().replace('"value": 0.9}', '"value": 0.91}'))
        metrics = run_dir / "metrics.csv"
        metrics.write_text(metrics.read_text().replace("step_s,0.9,s", "step_s,0.91,s"))
        assert fr.moebench(root, "provenance", *fr.provenance_args(run_dir)).returncode == 0
        assert stamp(root, "stamp", *cal).returncode == 0 and fx.calendar.submissions == 2
        rec = fr.read(run_dir / "provenance_stamp.json")
        hist = root / "audits" / ".ots-history" / fr.RUN
        assert rec["provenance_sha256"] != first and (hist / f"{first}.json.ots").is_file()
        fx.calendar.mine()
        assert stamp(root, "upgrade", *cal).returncode == 0  # upgrades every revision's proof
        for sha in (first, rec["provenance_sha256"]):
            r = ots(root, "-l", fx.calendar.url, "--bitcoin-node", fx.bitcoind.url, "verify", "-f",
                    str(hist / f"{sha}.json"), str(hist / f"{sha}.json.ots"))
            assert r.returncode == 0, r.stderr


def test_calendar_that_never_answers_costs_bounded_time(run):
    root, run_dir = run
    chain = Chain()
    hanging = Calendar(chain, hang=True)
    try:
        t = time.monotonic()
        r = stamp(root, "stamp", "-c", hanging.url, "-m", "1", "--timeout", "2")
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t < 25
        rec = fr.read(run_dir / "provenance_stamp.json")
        assert rec["status"] == "unreachable" and "timed out" in rec["reason"], rec
    finally:
        hanging.stop()
    # a pending proof whose calendar stops answering: the audit names the calendar and the timeout
    with Fixture() as fx:
        assert stamp(root, "stamp", "-c", fx.calendar.url, "-m", "1").returncode == 0
        fx.calendar.hang = True
        t = time.monotonic()
        r, report = _audit(root, "--timeout", "2", "-l", fx.calendar.url)
        assert time.monotonic() - t < 30
        assert r.returncode == 1 and f"calendar {fx.calendar.url} did not answer within 2 s" in r.stderr


def _audit(root, *args):
    r = fr.moebench(root, "audit", "--date", "2026-01-04", *args, timeout=120)
    reports = sorted((root / "audits").glob("AUDIT-2026-01-04*.md"), key=lambda p: p.stat().st_mtime)
    return r, reports[-1].read_text() if reports else ""
