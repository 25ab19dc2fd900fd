"""OpenTimestamps proof of provenance.json, made with the real `ots` client (opentimestamps-client 0.7.2).

`stamp` submits the file's digest to the calendars (`ots stamp -c URL ... -m M --timeout S`) and writes
provenance.json.ots when enough answered. With no network it gives up within the timeout and records the stamp as
`unreachable` with the client's reason: the run completes and `upgrade` finishes the job later. `upgrade` asks the
calendars for the Bitcoin attestation (`ots upgrade`, bounded by a subprocess timeout since the client has none)
and stamps first when no proof exists yet. Every proof is also kept as <history>/<run>/<sha256>.json.ots beside the
revision it proves; provenance_stamp.json (and <sha256>.stamp.json in the history) records the state.

Every revision gets its stamp when it is written (rule stamp runs after rule provenance). `upgrade` finishes every
pending proof of the run's history, not only the newest. An older revision that has no proof when a newer one
exists can never be stamped at its own time: it is marked `superseded` once, explicitly, in its <sha256>.stamp.json
(naming the revision that replaced it), and no longer blocks the audit: the newer revision names its sha256, so the
newer one's proof dates it too. status_from_proof() reads a run's stamp state from the proof itself.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .chain import (SUPERSEDED, StampError, chain_of, history_dir, proof_state, run_ots, settings,  # noqa: F401
                    stamp_record, status_from_proof, superseded_ok)
from .io import logger, read_json, sha256_file, write_json

# ---- reading proofs ------------------------------------------------------------------------------------------
def _archive(proof: Path, hist: Path, log) -> None:
    """Keep a proof in the history under the digest it proves (never overwriting a different one)."""
    try:
        digest = proof_state(proof)["digest"]
        dest = hist / f"{digest}.json.ots"
    except StampError as exc:
        log.warning("%s", exc)
        dest = hist / f"unreadable-{sha256_file(proof)}.ots"
    if dest.exists() and dest.read_bytes() != proof.read_bytes():
        dest = dest.with_name(f"{dest.name}.{sha256_file(proof)[:12]}")
    if not dest.exists():
        hist.mkdir(parents=True, exist_ok=True)
        shutil.copy2(proof, dest)
        log.info("kept %s as %s", proof, dest)


def mark_superseded(hist: Path, log) -> list[str]:
    """Mark, once, each revision older than HEAD that has no proof: it can no longer be stamped at its own time.
    Returns the sha256s marked now."""
    chain, marked = chain_of(hist), []
    for (child, child_doc), (sha, doc) in zip(chain, chain[1:]):
        rec = stamp_record(hist, sha)
        if (hist / f"{sha}.json.ots").exists() or rec.get("status") == SUPERSEDED:
            continue
        why = (f"revision {child_doc.get('revision')} ({child[:16]}) replaced it before any calendar stamped it; "
               "a proof made now would date it no earlier than a later revision's proof does, since that revision "
               "names its sha256")
        write_json(hist / f"{sha}.stamp.json", {
            "run": doc.get("run"), "revision": doc.get("revision"), "provenance_sha256": sha, "status": SUPERSEDED,
            "superseded_by": child, "marked": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "reason": why, "earlier_record": rec or None})
        log.info("revision %s (%s) marked %s: %s", doc.get("revision"), sha[:16], SUPERSEDED, why)
        marked.append(sha)
    return marked


# ---- stamp ---------------------------------------------------------------------------------------------------
def _reason(output: str, n_calendars: int, timeout_s) -> str:
    """The client's error lines, each once with a count, and how many calendars said nothing in time (the client
    prints one line per calendar that failed; a calendar still silent at the timeout prints none)."""
    lines = [l.strip() for l in output.splitlines() if l.strip() and not l.startswith(("Submitting", "Doing", "("))]
    errors = [l for l in lines if not l.startswith("Failed to create")]
    seen: dict[str, int] = {}
    for l in lines:
        seen[l] = seen.get(l, 0) + 1
    text = "; ".join(f"{l} (x{n})" if n > 1 else l for l, n in seen.items())
    silent = n_calendars - len(errors)
    if silent > 0:
        text = f"{silent} of {n_calendars} calendar(s) timed out (no answer within {timeout_s} s); " + text
    return text[:1500] or "no output from ots"


def stamp_file(target: Path, dest: Path, s: dict, log) -> tuple[str, str]:
    """`ots stamp` a copy of target in a temp dir; on success the proof goes to dest. Returns (status, reason)."""
    cals = list(s["calendars"])
    if not cals:
        return "failed", "no calendars configured (provenance.calendars is empty)"
    m = min(int(s["min_calendars"]), len(cals))
    tmp = Path(tempfile.mkdtemp(prefix="moebench-ots-"))
    try:
        shutil.copy2(target, tmp / target.name)
        wait = str(max(1, round(float(s["timeout_s"]))))  # the client takes whole seconds
        args = ["-v", *_cache_args(s), "stamp", "--timeout", wait, "-m", str(m)]
        for c in cals:
            args += ["-c", c]
        log.info("ots %s %s", " ".join(args), target)
        rc, out = run_ots(args + [target.name], timeout=float(s["timeout_s"]) + 20, cwd=tmp)
        log.info("ots stamp exit %d:\n%s", rc, out.strip())
        proof = tmp / f"{target.name}.ots"
        if rc == 0 and proof.is_file():
            atomic_copy(proof, dest)
            return "stamped", ""
        unreachable = rc == 124 or "within timeout" in out or "urlopen error" in out or "timed out" in out
        return "unreachable" if unreachable else "failed", _reason(out, len(cals), s["timeout_s"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_args(s: dict) -> list[str]:
    return ["--cache", s["cache"]] if s.get("cache") else []


def _whitelist_args(s: dict) -> list[str]:
    out = []
    for url in dict.fromkeys(list(s["calendars"]) + list(s["whitelist"])):  # calendars you stamp with are trusted
        out += ["-l", url]
    return out


def ensure_stamp(prov: Path, s: dict, log, try_stamp: bool = True) -> dict:
    """Make sure provenance.json has a proof: reuse the one for this exact content, else stamp it."""
    sha = sha256_file(prov)
    run = read_json(prov)["run"]
    hist = history_dir(s["history"], run)
    here, kept = Path(f"{prov}.ots"), hist / f"{sha}.json.ots"
    record = {"run": run, "provenance": str(prov), "provenance_sha256": sha, "ots": None, "history_ots": None,
              "calendars": list(s["calendars"]), "min_calendars": int(s["min_calendars"]),
              "timeout_s": s["timeout_s"], "attempted": None, "status": "unstamped", "reason": "no proof yet"}
    if here.exists():
        if _proves(here, sha):
            _merge_into(kept, here, log)  # the history keeps the more complete of the two
        else:
            _archive(here, hist, log)  # the proof of an earlier revision: kept in the history, then out of the way
            here.unlink()
    if not kept.exists() and try_stamp:
        record["attempted"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record["status"], record["reason"] = stamp_file(prov, kept, s, log)
    if kept.exists():
        if not here.exists() or here.read_bytes() != kept.read_bytes():
            atomic_copy(kept, here)
        st = proof_state(kept)
        record.update(ots=str(here), history_ots=str(kept), status=st["status"], pending_calendars=st["pending"],
                      bitcoin=st["bitcoin"], reason="")
    record["check"] = describe(record)
    return record


def _proves(proof: Path, sha: str) -> bool:
    try:
        return proof_state(proof)["digest"] == sha
    except StampError:
        return False


def _merge_into(kept: Path, here: Path, log) -> None:
    """Two proofs of the same digest (history copy and the one beside the file): the history keeps the more
    complete one under the plain name and the other one beside it (nothing is lost)."""
    if not kept.exists():
        atomic_copy(here, kept)
        return
    if kept.read_bytes() == here.read_bytes():
        return
    a, b = proof_state(kept), proof_state(here)
    if (len(b["bitcoin"]), len(b["pending"])) > (len(a["bitcoin"]), len(a["pending"])):
        shutil.copy2(kept, kept.with_name(f"{kept.name}.{sha256_file(kept)[:12]}"))
        atomic_copy(here, kept)
    else:
        _archive(here, kept.parent, log)


def atomic_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def describe(record: dict) -> str:
    """One plain sentence for the report."""
    st = record.get("status")
    if st == "complete":
        b = record["bitcoin"][0]
        return (f"Timestamped in Bitcoin block {b['height']}; check with `ots verify {record['ots']}` "
                "(needs a Bitcoin node, or use --no-bitcoin and compare the block's merkle root by hand).")
    if st == "pending":
        return (f"Submitted to {len(record.get('pending_calendars', []))} calendar(s); waiting for the Bitcoin "
                "attestation (a few hours). Run `snakemake ots_upgrade` later to complete the proof.")
    return (f"NOT timestamped: {st} — {record.get('reason') or 'no proof'}. The numbers are not yet anchored in "
            "time; run `snakemake ots_upgrade` on a machine with internet to stamp them.")


# ---- upgrade -------------------------------------------------------------------------------------------------
def upgrade_proof(proof: Path, s: dict, log) -> str:
    """`ots upgrade` a copy of the proof; replace the proof only with a valid, more complete one."""
    before = proof_state(proof)
    if before["status"] == "complete":
        return "complete"
    tmp = Path(tempfile.mkdtemp(prefix="moebench-ots-"))
    try:
        work = tmp / proof.name
        shutil.copy2(proof, work)
        args = ["-v", *_cache_args(s), *_whitelist_args(s), "upgrade", work.name]
        rc, out = run_ots(args, timeout=3 * float(s["timeout_s"]) + 10, cwd=tmp)
        log.info("ots upgrade %s exit %d:\n%s", proof, rc, out.strip())
        try:
            after = proof_state(work)
        except StampError as exc:
            log.warning("upgrade of %s gave no valid proof (%s); kept the old one", proof, exc)
            return before["status"]
        if after["digest"] == before["digest"] and len(after["bitcoin"]) > len(before["bitcoin"]):
            atomic_copy(work, proof)
            return "complete"
        if rc == 124:
            log.warning("calendar(s) of %s did not answer within %s s", proof, 3 * float(s["timeout_s"]) + 10)
        return before["status"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def upgrade(prov: Path, s: dict, log) -> dict:
    """Stamp the newest revision if it has no proof yet, mark older unproven revisions superseded, then upgrade
    every pending proof of the run's history (every revision, not only the newest)."""
    first = ensure_stamp(prov, s, log)
    hist = history_dir(s["history"], first["run"])
    mark_superseded(hist, log)
    for proof in sorted(hist.glob("*.json.ots")):
        try:
            log.info("%s: %s", proof.name, upgrade_proof(proof, s, log))
        except StampError as exc:
            log.error("%s", exc)
    record = ensure_stamp(prov, s, log, try_stamp=False)
    if record["status"] == "unstamped":  # the stamp attempt above failed: say why
        record.update(status=first["status"], reason=first["reason"], attempted=first["attempted"])
        record["check"] = describe(record)
    return record


def write_record(record: dict, out: Path, s: dict) -> None:
    write_json(out, record)
    write_json(history_dir(s["history"], record["run"]) / f"{record['provenance_sha256']}.stamp.json", record)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["stamp", "upgrade"])
    ap.add_argument("--provenance", required=True, help="results/<run>/provenance.json")
    ap.add_argument("--out", required=True, help="results/<run>/provenance_stamp.json")
    ap.add_argument("--config", help="the run's config.yaml (its `provenance:` block)")
    ap.add_argument("--settings", help="a `provenance:` block as JSON, over --config (the workflow passes its own)")
    ap.add_argument("--calendar", "-c", action="append", help="calendar URL (repeat); overrides the config")
    ap.add_argument("--whitelist", "-l", action="append", help="extra calendar trusted when upgrading")
    ap.add_argument("--min-calendars", "-m", type=int)
    ap.add_argument("--timeout", type=float, dest="timeout_s")
    ap.add_argument("--history")
    ap.add_argument("--cache", help="ots timestamp cache directory (default: the client's)")
    ap.add_argument("--log")
    a = ap.parse_args(argv)
    log = logger("stamp", a.log)
    prov = Path(a.provenance)
    try:
        cli = dict(calendars=a.calendar, whitelist=a.whitelist, min_calendars=a.min_calendars,
                   timeout_s=a.timeout_s, history=a.history, cache=a.cache)
        block = json.loads(a.settings) if a.settings else {}
        s = settings(a.config, **{**block, **{k: v for k, v in cli.items() if v not in (None, [])}})
        if not prov.is_file():
            raise StampError(f"{prov} does not exist: run `snakemake provenance` first")
        if a.action == "stamp":
            record = ensure_stamp(prov, s, log)
            mark_superseded(history_dir(s["history"], record["run"]), log)
        else:
            record = upgrade(prov, s, log)
    except (StampError, KeyError, ValueError, OSError) as exc:
        log.error("stamp: %s", exc)
        return 1
    write_record(record, Path(a.out), s)
    (log.info if record["status"] in ("pending", "complete") else log.warning)("%s", record["check"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
