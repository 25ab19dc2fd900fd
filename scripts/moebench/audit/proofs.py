"""The hash chain and its OpenTimestamps proofs: every revision back to the first, each required revision's
proof (complete and checked against a Bitcoin node, complete only, pending, missing, or superseded before it
could be stamped), and provenance_stamp.json claiming no more than the proof holds.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..chain import (SUPERSEDED, StampError, proof_state, read_head, read_proof, run_ots, sha256_bytes, stamp_record,
                     superseded_ok)
from ..io import read_json, sha256_file
from .levels import Findings


RANK = {"pending": 1, "complete": 2}  # how far a proof goes


def check_chain(prov: Path, data: bytes, doc: dict, hist: Path, F: Findings) -> list[tuple[int, str]]:
    """Walk HEAD back to revision 1; returns [(revision, sha256)] newest first."""
    sha = sha256_bytes(data)
    head = read_head(hist)
    if head is None:
        F.fail(f"{hist}/HEAD is missing: no revision history for this run, so the chain cannot be checked")
        return []
    if sha != head:
        where = f"revision {doc.get('revision')}" if isinstance(doc.get("revision"), int) else "the newest revision"
        kept = (hist / f"{sha}.json").is_file()
        F.fail(f"{prov} (sha256 {sha[:16]}) is not the chain's newest revision (HEAD {head[:16]})"
               + ("; it is an older revision" if kept else f": it was changed after it was written (compare with "
                  f"{where}, {hist / (head + '.json')})"))
    chain, cur, seen, expect = [], head, set(), None
    nfail = len(F.failed)
    while cur:
        if cur in seen:
            F.fail(f"chain loops back to revision {cur[:16]}")
            break
        seen.add(cur)
        p = hist / f"{cur}.json"
        label = f"revision {expect if expect else '?'} ({cur[:16]})"
        if not p.is_file():
            F.fail(f"chain broken at {label}: {p} is missing (named by the revision after it)")
            break
        raw = p.read_bytes()
        if sha256_bytes(raw) != cur:
            F.fail(f"chain broken at {label}: {p} was changed (it no longer hashes to its name)")
            break
        rev_doc = json.loads(raw)
        rev = rev_doc.get("revision")
        if expect is not None and rev != expect:
            F.fail(f"chain broken at {cur[:16]}: it says revision {rev}, the revision after it expects {expect}")
        chain.append((rev, cur))
        F.checked["revisions"] += 1
        cur, expect = rev_doc.get("previous_sha256"), (rev or 0) - 1
        if cur is None and rev != 1:
            F.fail(f"chain broken: revision {rev} ({chain[-1][1][:16]}) names no previous revision")
    if chain and len(F.failed) == nfail:
        F.ok(f"hash chain intact: {len(chain)} revision(s), newest {chain[0][1][:16]}")
    return chain


def _redact(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", url or "")


def probe_calendars(proof_path: Path, s: dict, F: Findings, label: str) -> None:
    """Ask each pending calendar (only whitelisted ones) whether the Bitcoin attestation is ready. A calendar that
    does not answer leaves the proof pending: it is named, and it is not a failure of the run."""
    import urllib.error

    from opentimestamps.calendar import (DEFAULT_CALENDAR_WHITELIST, CommitmentNotFoundError, RemoteCalendar,
                                         UrlWhitelist)
    from opentimestamps.core.notary import PendingAttestation

    trusted = UrlWhitelist(list(s["calendars"]) + list(s["whitelist"]))
    t = float(s["timeout_s"])
    for msg, att in read_proof(proof_path).timestamp.all_attestations():
        if not isinstance(att, PendingAttestation):
            continue
        uri = att.uri
        if uri not in trusted and uri not in DEFAULT_CALENDAR_WHITELIST:
            F.warn(f"{label}: calendar {uri} is not whitelisted; not contacted")
            continue
        try:
            RemoteCalendar(uri).get_timestamp(msg, timeout=t)
            F.warn(f"{label}: calendar {uri} has the Bitcoin attestation; run `snakemake ots_upgrade` to save it")
        except CommitmentNotFoundError as exc:
            F.warn(f"{label}: still pending at calendar {uri} ({exc.reason})")
        except (TimeoutError, OSError, urllib.error.URLError) as exc:
            why = getattr(exc, "reason", exc)
            kind = "did not answer within %g s" % t if "timed out" in str(why) else f"is unreachable ({why})"
            F.warn(f"{label}: calendar {uri} {kind}; the proof stays pending until it answers")


def verify_complete(label: str, rev_file: Path, proof: Path, s: dict, F: Findings) -> str:
    """A complete proof: PROVEN when `ots verify` passes against the node, FAILED when the node rejects it,
    ATTESTED (said plainly) when there is no node to ask."""
    if not s.get("bitcoin_node"):
        F.warn(f"{label}: complete proof (Bitcoin block {proof_state(proof)['bitcoin'][0]['height']}), NOT checked "
               "against a Bitcoin node: ATTESTED only (a made-up block looks the same offline; set "
               "MOEBENCH_BITCOIN_NODE or pass --bitcoin-node)")
        return "ATTESTED"
    args = ["--no-cache", "--bitcoin-node", s["bitcoin_node"], "verify", "-f", str(rev_file), str(proof)]
    rc, out = run_ots(args, timeout=3 * float(s["timeout_s"]) + 10)
    if rc == 0 and "Success!" in out:
        F.ok(f"{label}: `ots verify` passed against {_redact(s['bitcoin_node'])}: {out.strip()[-120:]}")
        return "PROVEN"
    F.fail(f"{label}: the Bitcoin node at {_redact(s['bitcoin_node'])} rejects the proof (`ots verify` exit {rc}): "
           f"{_redact(out.strip()[-400:])}")
    return "FAILED"


def check_revision_stamp(rev: int, sha: str, head: bool, hist: Path, s: dict, F: Findings,
                         check_calendars: bool) -> dict:
    label = f"revision {rev} ({sha[:16]})"
    proof, rec = hist / f"{sha}.json.ots", stamp_record(hist, sha)
    if not proof.is_file():
        if not head and rec.get("status") == SUPERSEDED:
            why = superseded_ok(rec, sha, hist)
            if why:
                F.fail(f"{label}: marked {SUPERSEDED} but {why}")
            else:
                F.ok(f"{label}: {SUPERSEDED} before it could be stamped ({rec.get('reason')}); dated by the proof "
                     "of a later revision through the chain, not required")
            return {"revision": rev, "sha256": sha, "stamp": SUPERSEDED}
        why = f"last attempt {rec.get('attempted')}: {rec.get('status')} — {rec.get('reason')}" if rec else \
            "never stamped"
        F.warn(f"{label} has no OpenTimestamps proof ({why}); `snakemake ots_upgrade` with internet stamps it"
               + ("" if head else " or marks it superseded"))
        F.stamps.append("UNSTAMPED")
        return {"revision": rev, "sha256": sha, "stamp": "missing"}
    try:
        st = proof_state(proof)
    except StampError as exc:
        F.fail(f"{label}: {exc}")
        return {"revision": rev, "sha256": sha, "stamp": "unreadable"}
    if st["digest"] != sha:
        F.fail(f"{label}: {proof} proves another file (digest {st['digest'][:16]})")
        return {"revision": rev, "sha256": sha, "stamp": "wrong file"}
    row = {"revision": rev, "sha256": sha, "stamp": st["status"], "bitcoin": [b["height"] for b in st["bitcoin"]],
           "pending": st["pending"]}
    if st["status"] == "complete":
        level = verify_complete(label, hist / f"{sha}.json", proof, s, F)
        row["stamp"] = {"PROVEN": "complete, verified", "ATTESTED": "complete, not verified"}.get(level, "rejected")
    else:
        level = "PENDING"
        if check_calendars:
            probe_calendars(proof, s, F, label)
        else:
            F.warn(f"{label}: proof still pending at {', '.join(st['pending'])}")
    if level != "FAILED":
        F.stamps.append(level)
    return row


def check_stamps(chain, hist: Path, prov: Path, run_dir: Path, s: dict, F: Findings,
                 check_calendars: bool) -> list[dict]:
    rows = [check_revision_stamp(rev, sha, i == 0, hist, s, F, check_calendars) for i, (rev, sha) in enumerate(chain)]
    here = Path(f"{prov}.ots")
    if here.is_file() and chain:
        try:
            d = proof_state(here)["digest"]
            if d != sha256_file(prov):
                F.fail(f"{here} proves a different file than {prov}: the provenance changed after it was stamped")
        except StampError as exc:
            F.fail(str(exc))
    check_stamp_record(run_dir, prov, hist, F)
    return rows


def check_stamp_record(run_dir: Path, prov: Path, hist: Path, F: Findings) -> None:
    """provenance_stamp.json may claim no more than the proof holds (the report shows the proof's state, not it)."""
    path = run_dir / "provenance_stamp.json"
    if not path.is_file() or not prov.is_file():
        return
    rec = read_json(path)
    sha = sha256_file(prov)
    proof = hist / f"{sha}.json.ots"
    actual = proof_state(proof)["status"] if proof.is_file() and _readable(proof) else None
    claims = rec.get("status")
    if rec.get("provenance_sha256") not in (None, sha):
        F.fail(f"{path} describes another provenance (sha256 {str(rec.get('provenance_sha256'))[:16]}, the file is "
               f"{sha[:16]}): stamp the newest revision (`snakemake ots_upgrade`) to bring it up to date")
    elif RANK.get(claims, 0) > RANK.get(actual, 0):
        F.fail(f"{path} says {claims!r} but the proof {'is ' + actual if actual else 'is missing'}")


def _readable(proof: Path) -> bool:
    try:
        proof_state(proof)
        return True
    except StampError:
        return False
