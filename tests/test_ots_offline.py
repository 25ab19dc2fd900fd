"""End to end with the REAL `ots` client and no network: a local OpenTimestamps calendar and a fake bitcoind
(tests/ots_fixture/servers.py) on ephemeral ports. The provenance is stamped (`ots stamp -c URL`), stays pending until
the calendar puts it in a made-up block, is upgraded (`ots -l URL upgrade`), then `ots --bitcoin-node ... verify`
passes on it and fails on a copy with one number changed. The audit's level follows the proofs: PENDING, then PROVEN
only where the (fake) node confirms them; a forged "complete" proof is ATTESTED without a node and FAILED with one.
A calendar that never answers costs a bounded time."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import BACKGROUND_NICE, background, snakemake  # noqa: E402
from ots_fixture import fakerun as fr  # noqa: E402
from ots_fixture.servers import Calendar, Chain, Fixture, Served  # noqa: E402

from moebench.stamp import status_from_proof  # noqa: E402

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
        assert r.returncode == 4 and r.stdout.startswith("AUDIT PENDING: "), r.stderr  # the calendar answered
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

        r, report = _audit(root)  # complete, but no node asked: ATTESTED, and it says so
        assert r.returncode == 3 and r.stdout.startswith("AUDIT ATTESTED: "), r.stderr
        assert "NOT checked against a Bitcoin node" in report
        r, report = _audit(root, "--bitcoin-node", fx.bitcoind.url)
        assert r.returncode == 0 and r.stdout.startswith("AUDIT PROVEN: "), r.stderr
        assert "`ots verify` passed against http://***@127.0.0.1" in report and "| complete, verified (block" in report
        assert fx.bitcoind.password not in report
        assert status_from_proof(run_dir / "provenance.json") == "complete"

        # one number changed: the proof no longer matches, for `ots verify` and for the audit
        doc = json.loads((run_dir / "provenance.json").read_text())
        doc["numbers"][0]["value"] = doc["numbers"][0]["value"] * 0.9
        tampered = run_dir / "provenance.tampered.json"
        tampered.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        r = ots(root, "--bitcoin-node", fx.bitcoind.url, "verify", "-f", str(tampered), str(proof))
        assert r.returncode == 1 and "File does not match original!" in r.stderr
        shutil.copy(tampered, run_dir / "provenance.json")
        r, report = _audit(root, "--bitcoin-node", fx.bitcoind.url)
        assert r.returncode == 1 and r.stdout.startswith("AUDIT FAILED: ")
        assert f"{R}/provenance.json.ots proves a different file" in r.stderr
        assert status_from_proof(run_dir / "provenance.json").startswith("invalid: provenance.json.ots proves another")
        assert "changed after it was written" in r.stderr


def test_new_revision_is_stamped_and_old_proof_kept(run):
    root, run_dir = run
    with Fixture() as fx:
        cal = ["-c", fx.calendar.url, "-m", "1", "--cache", str(root / ".cache" / "ots")]
        assert stamp(root, "stamp", *cal).returncode == 0
        first = fr.read(run_dir / "provenance_stamp.json")["provenance_sha256"]
        r = stamp(root, "stamp", *cal)  # unchanged: the same proof, no second submission
        assert r.returncode == 0 and fx.calendar.submissions == 1
        _second_revision(root, run_dir)
        assert stamp(root, "stamp", *cal).returncode == 0 and fx.calendar.submissions == 2
        rec = fr.read(run_dir / "provenance_stamp.json")
        hist = root / "audits" / ".ots-history" / fr.RUN
        assert rec["provenance_sha256"] != first and (hist / f"{first}.json.ots").is_file()
        r, _ = _audit(root, "--no-calendars", "--bitcoin-node", fx.bitcoind.url)
        assert r.returncode == 4  # both revisions pending: not proven yet
        fx.calendar.mine()
        assert stamp(root, "upgrade", *cal).returncode == 0  # upgrades every revision's proof
        for sha in (first, rec["provenance_sha256"]):
            r = ots(root, "-l", fx.calendar.url, "--bitcoin-node", fx.bitcoind.url, "verify", "-f",
                    str(hist / f"{sha}.json"), str(hist / f"{sha}.json.ots"))
            assert r.returncode == 0, r.stderr
        r, report = _audit(root, "--no-calendars", "--bitcoin-node", fx.bitcoind.url)
        assert r.returncode == 0 and r.stdout.startswith("AUDIT PROVEN: "), r.stderr + report
        assert report.count("| complete, verified (block") == 2


def test_revision_superseded_unstamped_is_marked_once_and_later_ones_reach_proven(run):
    """Revision 1 written offline (calendar unreachable), revision 2 stamped online: revision 1 can never be stamped at
    its own time, is marked so once, and the run is PROVEN on revision 2's proof (which names revision 1)."""
    root, run_dir = run
    assert stamp(root, "stamp", "-c", "http://127.0.0.1:9", "-m", "1", "--timeout", "2").returncode == 0
    first = fr.read(run_dir / "provenance_stamp.json")["provenance_sha256"]
    hist = root / "audits" / ".ots-history" / fr.RUN
    _second_revision(root, run_dir)
    with Fixture() as fx:
        cal = ["-c", fx.calendar.url, "-m", "1", "--cache", str(root / ".cache" / "ots")]
        assert stamp(root, "stamp", *cal).returncode == 0
        mark = fr.read(hist / f"{first}.stamp.json")
        assert mark["status"] == "superseded" and mark["earlier_record"]["status"] == "unreachable"
        assert mark["superseded_by"] == fr.read(run_dir / "provenance_stamp.json")["provenance_sha256"]
        before = (hist / f"{first}.stamp.json").read_bytes()
        fx.calendar.mine()
        assert stamp(root, "upgrade", *cal).returncode == 0
        assert (hist / f"{first}.stamp.json").read_bytes() == before  # marked once, not again
        r, report = _audit(root, "--no-calendars", "--bitcoin-node", fx.bitcoind.url)
        assert r.returncode == 0 and r.stdout.startswith("AUDIT PROVEN: "), r.stderr + report
        assert "| 1 | " in report and "| superseded |" in report
        # a mark must name a real successor: one that does not is a failure, not a way around the proofs
        (hist / f"{first}.stamp.json").write_text(before.decode().replace(mark["superseded_by"], "0" * 64))
        r, _ = _audit(root, "--no-calendars", "--bitcoin-node", fx.bitcoind.url)
        assert r.returncode == 1 and "marked superseded but the revision it names" in r.stderr


def _second_revision(root, run_dir):
    """hf_bf16 draw 1 measured 0.01 s slower throughout (its log, steps.csv and row), then a new revision."""
    import re

    log = run_dir / "arms/hf_bf16/draw1/run.log"
    text = re.sub(r"timed step (\d+)/6: ([0-9.]+) s", lambda m: f"timed step {m[1]}/6: {float(m[2]) + 0.01:.4f} s",
                  log.read_text())
    log.write_text(text.replace('"value": 0.9}', '"value": 0.91}'))
    steps = log.with_name("steps.csv")
    times = [float(m) for m in re.findall(r"timed step \d+/6: ([0-9.]+) s", text)]
    steps.write_text("step,seconds,tokens\n" + "".join(f"{i},{t!r},4096\n" for i, t in enumerate(times, 1)))
    metrics = log.with_name("metrics.csv")
    metrics.write_text(metrics.read_text().replace("step_s,0.9,s", "step_s,0.91,s"))
    fr.aggregate_run(root, run_dir)
    assert fr.moebench(root, "provenance", *fr.provenance_args(run_dir)).returncode == 0


def _forge(proof: Path, target: Path, height: int) -> None:
    """A "complete" proof made up by hand: the file's digest attested directly in Bitcoin block `height`."""
    import hashlib

    from opentimestamps.core.notary import BitcoinBlockHeaderAttestation
    from opentimestamps.core.op import OpSHA256
    from opentimestamps.core.serialize import StreamSerializationContext
    from opentimestamps.core.timestamp import DetachedTimestampFile, Timestamp

    ts = Timestamp(hashlib.sha256(target.read_bytes()).digest())
    ts.attestations.add(BitcoinBlockHeaderAttestation(height))
    with open(proof, "wb") as fh:
        DetachedTimestampFile(OpSHA256(), ts).serialize(StreamSerializationContext(fh))


def test_forged_complete_proof_is_attested_offline_and_failed_with_a_node(run):
    root, run_dir = run
    prov = run_dir / "provenance.json"
    sha = hashlib.sha256(prov.read_bytes()).hexdigest()
    hist = root / "audits" / ".ots-history" / fr.RUN
    with Fixture() as fx:
        height = fx.chain.add(b"\x11" * 32)  # a real block of the fake chain, whose merkle root is another
        for dest in (hist / f"{sha}.json.ots", Path(f"{prov}.ots")):
            _forge(dest, prov, height)
        assert status_from_proof(prov) == "complete"  # what the proof claims; only a node can check it
        r, report = _audit(root, "--no-calendars")
        assert r.returncode == 3 and r.stdout.startswith("AUDIT ATTESTED: "), r.stderr
        assert "NOT checked against a Bitcoin node" in report and "PROVEN" not in r.stdout
        r, report = _audit(root, "--no-calendars", "--bitcoin-node", fx.bitcoind.url)
        assert r.returncode == 1 and r.stdout.startswith("AUDIT FAILED: ")
        assert f"revision 1 ({sha[:16]}): the Bitcoin node at http://***@127.0.0.1" in r.stderr
        assert "rejects the proof" in r.stderr
        other = run_dir / "tier.json"  # a proof of another file, kept under this revision's name
        _forge(hist / f"{sha}.json.ots", other, height)
        r, _ = _audit(root, "--no-calendars")
        assert r.returncode == 1 and f"revision 1 ({sha[:16]}): {hist.relative_to(root)}/{sha}.json.ots proves " \
            "another file" in r.stderr


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
        assert r.returncode == 4 and f"calendar {fx.calendar.url} did not answer within 2 s" in report


def _audit(root, *args):
    r = fr.moebench(root, "audit", "--date", "2026-01-04", *args, timeout=120)
    reports = sorted((root / "audits").glob("AUDIT-2026-01-04*.md"), key=lambda p: p.stat().st_mtime)
    return r, reports[-1].read_text() if reports else ""


@background("ots_rules")
def ots_rules(tmp_path_factory):
    """The Snakemakes of test_snakemake_ots_upgrade_and_audit_rules_reach_proven, in order, beside the unit tests
    (niced; the calendar and node in a process of their own, servers.Served). Returns {step: (what ran, the
    stamp status or audit level it left)}."""
    root = tmp_path_factory.mktemp("ots_rules")
    run_dir = fr.make_run(root)
    seen = {"provenance": (fr.moebench(root, "provenance", *fr.provenance_args(run_dir)), None)}
    fr.snakemake_harness(root)  # its files; its Snakemakes run here
    level = root / "audits" / "level.txt"

    def sm(*args):
        return snakemake(root, "--cores", "1", *args, env=fr.env(root), timeout=400, nice=BACKGROUND_NICE)

    def status():
        stamp = run_dir / "provenance_stamp.json"
        return fr.read(stamp)["status"] if stamp.is_file() else None

    with Served() as fx:
        block = (f"provenance={{calendars: ['{fx.calendar.url}'], min_calendars: 1, timeout_s: 3, "
                 f"whitelist: ['{fx.calendar.url}']}}")
        seen["stamped"] = (sm("ots_upgrade", "--config", block), status())
        fx.calendar.mine()
        seen["upgraded"] = (sm("ots_upgrade", "--config", block), status())
        node = block.replace("}", f", bitcoin_node: '{fx.bitcoind.url}'}}")
        seen["audit_node"] = (sm("audit", "--config", node), level.read_text() if level.is_file() else "")
        seen["audit"] = (sm("audit", "--config", block), level.read_text() if level.is_file() else "")
    return seen


def test_snakemake_ots_upgrade_and_audit_rules_reach_proven(ots_rules):
    """The rules as a user runs them: `snakemake ots_upgrade` (the workflow's `provenance:` settings, passed as JSON)
    stamps and then completes the proof; `snakemake audit` prints the level, writes it, and is PROVEN with a node."""
    r, _ = ots_rules["provenance"]
    assert r.returncode == 0, r.stderr[-3000:]
    r, status = ots_rules["stamped"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert status == "pending"
    r, status = ots_rules["upgraded"]  # after the calendar put it in a block
    assert r.returncode == 0 and status == "complete", r.stderr[-3000:]
    r, level = ots_rules["audit_node"]
    assert r.returncode == 0 and "AUDIT PROVEN: " in r.stdout + r.stderr, r.stderr[-3000:]
    assert level.startswith("PROVEN\n")
    r, level = ots_rules["audit"]  # no node: ATTESTED, which the rule reports without failing
    assert r.returncode == 0 and level.startswith("ATTESTED\n")
