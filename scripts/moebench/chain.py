"""The provenance's hash chain and its OpenTimestamps proofs, as every writer and reader needs them: writing a
revision (commit; run provenance and docs/figures.json alike), where a run's revisions are kept
(<history>/<run>/<sha256>.json, HEAD), what a proof holds (the digest it proves, pending calendars,
Bitcoin attestations) and the run's stamp state read from the proof itself. Shared by the provenance, stamp and
audit stages and the report (a stage may not import another, so these live here)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path

from .io import atomic_write, read_json, run_bounded, sha256_file

DEFAULT_HISTORY = "audits/.ots-history"


def history_dir(history: str | Path, run: str) -> Path:
    return Path(history) / run


def read_head(hist: Path) -> str | None:
    head = hist / "HEAD"
    if not head.is_file():
        return None
    return head.read_text().strip() or None


def resolve_source(source: str, run_dir: Path, root: Path = Path(".")) -> Path | None:
    """A row's source is a path relative to the repository root (logs) or to the run directory
    (comparison.csv for derived rows)."""
    if not source:
        return None
    for cand in (root / source, run_dir / source, Path(source)):
        if cand.is_file():
            return cand
    return None


def sha256_bytes(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


CHAIN_KEYS = ("revision", "previous_sha256", "created")


class ChainError(Exception):
    """A broken history: the message says which revision file and what is wrong with it."""


def canonical(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


# ---- writing a revision ----------------------------------------------------------------------------------------
def strip_chain(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in CHAIN_KEYS}


def load_revision(hist: Path, sha: str) -> tuple[bytes, dict]:
    p = hist / f"{sha}.json"
    if not p.is_file():
        raise ChainError(f"history broken: revision {sha} ({p}) is missing")
    data = p.read_bytes()
    if sha256_bytes(data) != sha:
        raise ChainError(f"history broken: {p} does not hash to its name (it was changed)")
    return data, json.loads(data)


def commit(content: dict, out: Path, hist: Path, log=None, dump=None) -> tuple[str, bool]:
    """Write the revision (new one only when the content changed) to the history, HEAD and `out`; `dump` lays
    out its text (default `canonical`). Returns (sha256, new?)."""
    dump = dump or canonical
    content = json.loads(canonical(content))  # the form it will have when read back
    head = read_head(hist)
    rev, prev_bytes = 1, None
    if head:
        prev_bytes, prev = load_revision(hist, head)
        if strip_chain(prev) == content:
            _keep_unchained(out, hist, head, log)
            if not out.is_file() or out.read_bytes() != prev_bytes:
                atomic_write(out, prev_bytes.decode())
            return head, False
        rev = int(prev.get("revision", 0)) + 1
    doc = {**content, "revision": rev, "previous_sha256": head,
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    text = dump(doc)
    sha = sha256_bytes(text.encode())
    _keep_unchained(out, hist, sha, log)
    atomic_write(hist / f"{sha}.json", text)  # history first: a crash never leaves a HEAD without its file
    atomic_write(hist / "HEAD", sha + "\n")
    atomic_write(out, text)
    return sha, True


def _keep_unchained(out: Path, hist: Path, sha: str, log) -> None:
    """A file (provenance.json, docs/figures.json) that is in no revision (edited by hand?) is kept in the history,
    not overwritten."""
    if not out.is_file():
        return
    cur = sha256_file(out)
    if cur != sha and not (hist / f"{cur}.json").is_file():
        dest = hist / f"unchained-{cur}.json"
        atomic_write(dest, out.read_text(errors="replace"))
        if log:
            log.warning("%s was in no revision of the chain; kept as %s", out, dest)


# The client's own defaults (otsclient/cmds.py stamp_command, opentimestamps.calendar.DEFAULT_AGGREGATORS).
DEFAULT_CALENDARS = ["https://a.pool.opentimestamps.org", "https://b.pool.opentimestamps.org",
                     "https://a.pool.eternitywall.com", "https://ots.btc.catallaxy.com"]
DEFAULTS = {"calendars": DEFAULT_CALENDARS, "min_calendars": 2, "timeout_s": 5, "whitelist": [],
            "bitcoin_node": "", "history": DEFAULT_HISTORY, "require_stamp": True}
SUPERSEDED = "superseded"


class StampError(Exception):
    pass


def settings(config_path: str | None, **overrides) -> dict:
    """The `provenance:` block of the run's config over the defaults, then overrides (the workflow's own block,
    command-line options)."""
    import yaml

    cfg = {}
    if config_path:
        cfg = (yaml.safe_load(Path(config_path).read_text()) or {}).get("provenance") or {}
    out = {**DEFAULTS, **cfg}
    out.update({k: v for k, v in overrides.items() if v not in (None, [])})
    # a node URL holds credentials: better in the environment than in a committed config
    out["bitcoin_node"] = out.get("bitcoin_node") or os.environ.get("MOEBENCH_BITCOIN_NODE", "")
    return out


def ots_binary() -> str:
    """The `ots` of this interpreter's environment, else the one on PATH."""
    here = Path(sys.executable).absolute().parent / "ots"  # absolute: ots may run in another cwd
    found = str(here) if here.exists() else shutil.which("ots")
    if not found:
        raise StampError("the `ots` command is not installed: pip install opentimestamps-client==0.7.2")
    return found


def run_ots(args: list[str], timeout: float, cwd=None) -> tuple[int, str]:
    """Run the client, killing its whole process group past `timeout`; returns (exit code, output)."""
    rc, out = run_bounded([ots_binary(), *args], timeout, cwd=cwd)
    if rc is None:
        return 124, out + f"\n(ots {args[-2] if len(args) > 1 else ''} killed after {timeout:.0f} s)"
    return rc, out


def read_proof(path: str | Path):
    """The DetachedTimestampFile in an .ots file; StampError when it is not one."""
    from opentimestamps.core.serialize import DeserializationError, StreamDeserializationContext
    from opentimestamps.core.timestamp import DetachedTimestampFile

    try:
        with open(path, "rb") as fh:
            return DetachedTimestampFile.deserialize(StreamDeserializationContext(fh))
    except (DeserializationError, OSError, ValueError) as exc:
        raise StampError(f"{path} is not a readable OpenTimestamps proof: {exc}") from exc


def proof_state(path: str | Path) -> dict:
    """What a proof holds: the digest it proves, calendars still pending, Bitcoin attestations."""
    from opentimestamps.core.notary import BitcoinBlockHeaderAttestation, PendingAttestation

    proof = read_proof(path)
    pending, bitcoin = set(), []
    for msg, att in proof.timestamp.all_attestations():
        if isinstance(att, PendingAttestation):
            pending.add(att.uri)
        elif isinstance(att, BitcoinBlockHeaderAttestation):
            bitcoin.append({"height": att.height, "merkle_root": msg[::-1].hex()})
    return {"digest": proof.file_digest.hex(), "hash": proof.file_hash_op.TAG_NAME, "pending": sorted(pending),
            "bitcoin": sorted(bitcoin, key=lambda b: b["height"]),
            "status": "complete" if bitcoin else "pending"}


def status_from_proof(path: str | Path) -> str:
    """A run's stamp state read from its proof, never from a JSON field: `path` is results/<run>/provenance.json
    (or its .ots). Returns "complete" (a Bitcoin attestation is in the proof; whether a node confirms it is the
    audit's job: until then it is ATTESTED, not PROVEN), "pending", "unstamped" (no proof), or "invalid: <why>"
    (unreadable, or the proof of another file)."""
    path = Path(path)
    prov = path.with_suffix("") if path.suffix == ".ots" else path
    proof = Path(f"{prov}.ots")
    if not proof.is_file():
        return "unstamped"
    if not prov.is_file():
        return f"invalid: {prov} is missing"
    try:
        st = proof_state(proof)
    except StampError:
        return f"invalid: {proof.name} is not a readable OpenTimestamps proof"
    if st["digest"] != sha256_file(prov):
        return f"invalid: {proof.name} proves another file than {prov.name}"
    return st["status"]


def stamp_record(hist: Path, sha: str) -> dict:
    p = hist / f"{sha}.stamp.json"
    return read_json(p) if p.is_file() else {}


def chain_of(hist: Path) -> list[tuple[str, dict]]:
    """[(sha256, revision document)] from HEAD back to the first revision, as far as the files go."""
    out, cur, seen = [], read_head(hist), set()
    while cur and cur not in seen and (hist / f"{cur}.json").is_file():
        seen.add(cur)
        doc = read_json(hist / f"{cur}.json")
        out.append((cur, doc))
        cur = doc.get("previous_sha256")
    return out


def superseded_ok(rec: dict, sha: str, hist: Path) -> str | None:
    """None when a `superseded` mark is sound (it names this revision and a revision whose previous_sha256 is this
    one); otherwise what is wrong with it."""
    if rec.get("provenance_sha256") != sha:
        return f"its record names another revision ({str(rec.get('provenance_sha256'))[:16]})"
    child = hist / f"{rec.get('superseded_by')}.json"
    if not child.is_file():
        return f"the revision it names as its successor ({str(rec.get('superseded_by'))[:16]}) is not in the history"
    if read_json(child).get("previous_sha256") != sha:
        return f"its named successor ({str(rec.get('superseded_by'))[:16]}) does not name it as previous revision"
    return None
