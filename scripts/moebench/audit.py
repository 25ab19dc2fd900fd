"""Audit the provenance of every run: re-derive each number from its raw log, recompute the derived ones with this
module's own arithmetic, check the hash chain back to the first revision, check the OpenTimestamps proofs, re-hash
the inputs. Findings go to audits/AUDIT-<date>.md and one summary line names the level reached:

  PROVEN     every required revision's proof is complete and `ots verify` passed against a Bitcoin node   exit 0
  ATTESTED   complete proofs that no node checked (offline a forged proof looks the same: not a proof yet)   exit 3
  PENDING    a proof still waits for its Bitcoin block (calendars not asked, or not answered yet)            exit 4
  UNSTAMPED  a required revision has no proof at all (stamped offline: `snakemake ots_upgrade` with internet) exit 5
  FAILED     a number, a row, the chain, a proof or an input does not check out (each failure is named)      exit 1

Below FAILED every level means all numbers, rows, the chain and the inputs checked out; the level says only how
far the proofs go. Exit 2 is a usage error. A revision superseded before it could be stamped is marked so once in
its <sha256>.stamp.json (stamp.mark_superseded); the proof of a later revision dates it through the chain, so it is
not required.

A number is re-derived from the `MOEBENCH_ROW {json}` line its source log holds (metrics.log_row). Every stage's
logs are scanned (bench, validate, offload, sweep): a logged row the provenance lacks is a failure, and so is an
expected log (from the run's config and tier plan) that is missing. Each draw's step_s median and interquartile
range are recomputed from its per-step lines ("timed step i/n: x s", within their printed precision) and from
steps.csv where the draw wrote one; comparison medians and speedups are recomputed from the checked rows.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from .chain import (SUPERSEDED, StampError, history_dir, proof_state, read_head, read_proof, resolve_source,
                    run_ots, settings, sha256_bytes, stamp_record, superseded_ok)
from .harness import draw_console
from .ids import number_id, row_id
from .io import atomic_write, logger, read_json, sha256_file
from .metrics import LOG_TAG, Row

FIELDS = ("value", "unit", "status", "reason", "n", "spread")
# Levels, best first, and the exit code of each (FAILED is 1 so that any plain `&&` chain stops on it).
LEVELS = ("PROVEN", "ATTESTED", "PENDING", "UNSTAMPED", "FAILED")
EXIT = {"PROVEN": 0, "ATTESTED": 3, "PENDING": 4, "UNSTAMPED": 5, "FAILED": 1}
VALUED = ("measured", "degraded")
RANK = {"pending": 1, "complete": 2}  # how far a proof goes


class Findings:
    def __init__(self):
        self.items: list[tuple[str, str]] = []
        self.checked = {"numbers": 0, "derived": 0, "steps": 0, "logs": 0, "inputs": 0, "revisions": 0}
        self.stamps: list[str] = []  # the level of each required revision's proof

    def fail(self, msg):
        self.items.append(("FAIL", msg))

    def warn(self, msg):
        self.items.append(("WARN", msg))

    def ok(self, msg):
        self.items.append(("OK", msg))

    @property
    def failed(self):
        return [m for lvl, m in self.items if lvl == "FAIL"]

    @property
    def level(self) -> str:
        if self.failed:
            return "FAILED"
        return worst(self.stamps) if self.stamps else "UNSTAMPED"


def worst(levels) -> str:
    return max(levels, key=LEVELS.index)


# ---- logs --------------------------------------------------------------------------------------------------
def parse_log(path: Path, F: Findings) -> dict[str, Row]:
    """{id: Row} of a log's MOEBENCH_ROW lines; a malformed line or a repeated id is a failure naming the line."""
    out: dict[str, Row] = {}
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if LOG_TAG + " " not in line:
            continue
        try:
            row = Row(**json.loads(line.split(LOG_TAG + " ", 1)[1]))
        except (ValueError, TypeError) as exc:
            F.fail(f"{path}:{i}: malformed {LOG_TAG} line ({exc})")
            continue
        rid = row_id(row)
        if rid in out:
            F.fail(f"{path}:{i}: {rid} logged twice: which value is the measured one is ambiguous")
        out[rid] = row
    return out


def same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == b or math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b or (a in (None, "") and b in (None, ""))


def diff(number: dict, row: dict, log: Path | None = None) -> list[str]:
    fields = FIELDS
    if log is not None and console_degraded(number, row, log):
        fields = tuple(f for f in FIELDS if f not in ("status", "reason"))
    return [f"{f}: provenance {number.get(f)!r} vs log {row.get(f)!r}" for f in fields
            if not same(number.get(f), row.get(f))]


CONSOLE_MORE = re.compile(r" \(\+\d+ more\)$")


def console_degraded(number: dict, row: dict, log: Path) -> bool:
    """A row logged `measured` that the aggregate marked `degraded` afterwards, for a fallback line its console.log
    holds (aggregate.console_degraded: draws measured before the process looked for such lines): true only when
    that line really is in the console.log beside the log."""
    reason = str(number.get("reason") or "")
    if number.get("status") != "degraded" or row.get("status") != "measured" or not reason.startswith("console: "):
        return False
    line = CONSOLE_MORE.sub("", reason.removeprefix("console: ")).removesuffix(" …")
    return bool(line) and line in draw_console(log.parent)




# ---- chain and stamps --------------------------------------------------------------------------------------
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


# ---- numbers -----------------------------------------------------------------------------------------------
# Every stage's own logs (rule logs under logs/ echo them and are not sources).
STAGE_LOGS = ("arms/*/draw*/run.log", "validate/*/run.log", "offload/*/*/run.log", "sweep/*/*.log")


def expected_logs(doc: dict, run_dir: Path) -> list[Path]:
    """The stage logs the run's config and tier plan say it made: each arm's draws, each validated arm, each
    offload run, each sweep. A missing one is a dropped stage, not an absent file by design."""
    cfg = (doc.get("inputs", {}).get("config") or {}).get("content") or {}
    tier = run_dir / "tier.json"
    draws = (read_json(tier).get("plan") or {}).get("draws") if tier.is_file() else None
    arms = cfg.get("arms") or []
    out = [run_dir / "arms" / a / f"draw{k}" / "run.log" for a in arms for k in range(1, (draws or 0) + 1)]
    validate = (cfg.get("validate") or {}).get("arms")
    out += [run_dir / "validate" / a / "run.log" for a in (arms if validate is None else validate) if a in arms]
    for spec in (cfg.get("offload") or {}).get("runs") or []:
        arm, mode = spec.split(":")
        out.append(run_dir / "offload" / arm / mode / "run.log")
    if cfg.get("sweeps"):
        out += [run_dir / "sweep" / a / f"{k}.log" for a in arms for k in ("seq", "batch")]
    return out


def check_numbers(doc: dict, run_dir: Path, root: Path, F: Findings) -> dict[Path, dict[str, Row]]:
    """Every number of a log against that log; every row of every stage log must be in the provenance. Returns
    {log: {id: row}}."""
    logs: dict[Path, dict[str, Row]] = {}
    numbers = doc.get("numbers") or []
    ids = {n.get("id") for n in numbers}
    for n in numbers:
        if n.get("stage") in ("comparison", "compare"):
            continue  # recomputed in check_derived
        nid = n.get("id")
        expected = number_id(n.get("run"), n.get("stage"), n.get("arm"), n.get("draw"), n.get("metric"))
        if nid != expected:
            F.fail(f"number {nid}: its id does not match its fields ({expected})")
        src = resolve_source(n.get("source", ""), run_dir, root)
        if src is None:
            F.fail(f"number {nid}: source log {n.get('source')!r} is missing")
            continue
        src = src.resolve()
        if src not in logs:
            logs[src] = parse_log(src, F)
            got = sha256_file(src)
            if got != n.get("source_sha256"):
                F.fail(f"{_rel(src, root)} changed since the provenance was written (sha256 "
                       f"{n.get('source_sha256', '')[:16]} -> {got[:16]})")
        row = logs[src].get(nid)
        if row is None:
            F.fail(f"number {nid} = {n.get('value')!r}: not in its source log {_rel(src, root)}")
            continue
        bad = diff(n, asdict(row), src)
        if bad:
            F.fail(f"number {nid}: does not match its source log {_rel(src, root)}: " + "; ".join(bad))
        else:
            F.checked["numbers"] += 1
    for pattern in STAGE_LOGS:
        for log in sorted(run_dir.glob(pattern)):
            if log.resolve() not in logs:
                logs[log.resolve()] = parse_log(log, F)
    for log in expected_logs(doc, run_dir):
        if not log.is_file():
            F.fail(f"{_rel(log, root)} is missing: the run's config and tier plan say this stage ran, and its rows "
                   "are not in the provenance")
    for src, rows in logs.items():
        F.checked["logs"] += 1
        for rid in rows:
            if rid not in ids:
                F.fail(f"{_rel(src, root)}: logged number {rid} is missing from the provenance")
    return logs


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def check_metrics_csv(doc: dict, run_dir: Path, F: Findings) -> None:
    from .metrics import read_rows

    path = run_dir / "metrics.csv"
    if not path.is_file():
        F.warn(f"{path} not present; numbers checked against the logs only")
        return
    by_id = {n["id"]: n for n in doc.get("numbers", [])}
    seen = set()
    for r in read_rows(path):
        n = by_id.get(row_id(r))
        seen.add(row_id(r))
        if n is None:
            F.fail(f"{path}: row {row_id(r)} is missing from the provenance")
        elif diff(n, asdict(r)):
            F.fail(f"{path}: row {row_id(r)} differs from the provenance: " + "; ".join(diff(n, asdict(r))))
    for nid, n in by_id.items():
        if n.get("stage") not in ("comparison", "compare") and nid not in seen:
            F.fail(f"{path}: row {nid} of the provenance is missing from it")


# ---- per-step times: this module's own median and interquartile range ----------------------------------------
TIMED = re.compile(r"timed step (\d+)(?:/(\d+))?: ([0-9.eE+-]+) s\b")


def _median(xs: list[float]) -> float:
    s, n = sorted(xs), len(xs)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _quartile(s: list[float], q: float) -> float:
    """Linear interpolation between order statistics at q * (n - 1) (the 'inclusive' quartile)."""
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _iqr(xs: list[float]) -> float:
    s = sorted(xs)
    return _quartile(s, 0.75) - _quartile(s, 0.25) if len(s) > 1 else 0.0


def timed_steps(log: Path) -> tuple[list[float], list[str], int]:
    """The per-step times a log prints, problems with their numbering, and the decimals they are printed with."""
    times, problems, decimals = [], [], 9
    for m in TIMED.finditer(log.read_text(errors="replace")):
        i, n, x = int(m.group(1)), m.group(2), m.group(3)
        if i != len(times) + 1:
            problems.append(f"step {i} follows step {len(times)}")
        if n is not None and int(n) < i:
            problems.append(f"step {i}/{n}")
        times.append(float(x))
        decimals = min(decimals, len(x.split(".")[1]) if "." in x else 0)
    return times, problems, decimals


def steps_csv(path: Path) -> list[float] | None:
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        return [float(r["seconds"]) for r in csv.DictReader(fh)]


def check_steps(doc: dict, root: Path, run_dir: Path, F: Findings) -> None:
    """Each bench draw's step_s (median) and spread (IQR) recomputed from the per-step lines of its run.log, within
    their printed precision (each printed time is within half a unit of its last digit, so are the median and
    each quartile), and from steps.csv exactly where the draw wrote one."""
    for n in doc.get("numbers") or []:
        if n.get("stage") != "bench" or n.get("metric") != "step_s" or n.get("status") not in VALUED:
            continue
        src = resolve_source(n.get("source", ""), run_dir, root)
        if src is None:
            continue  # named by check_numbers
        times, problems, decimals = timed_steps(src)
        exact = steps_csv(src.with_name("steps.csv"))
        label = f"number {n['id']} = {n.get('value')!r}"
        if problems:
            F.fail(f"{label}: per-step lines of {_rel(src, root)} are out of order ({'; '.join(problems[:3])})")
        if not times and exact is None:
            F.fail(f"{label}: {_rel(src, root)} has no per-step lines ('timed step i/n: x s') to recompute it from")
            continue
        half = 0.5 * 10 ** -decimals + 1e-12
        for what, xs, tol in (("per-step lines", times, half), ("steps.csv", exact, 1e-9)):
            if not xs:
                continue
            bad = []
            if n.get("n") is not None and n["n"] != len(xs):
                bad.append(f"n {n['n']} but {len(xs)} steps")
            if not math.isclose(_median(xs), n["value"], rel_tol=1e-9, abs_tol=tol):
                bad.append(f"median {_median(xs):.6g}")
            if n.get("spread") is not None and not math.isclose(_iqr(xs), n["spread"], rel_tol=1e-9,
                                                                abs_tol=2 * tol):
                bad.append(f"interquartile range {_iqr(xs):.6g} (recorded {n['spread']:.6g})")
            if bad:
                F.fail(f"{label}: recomputed from the {what} of {_rel(src, root)}: " + ", ".join(bad))
            else:
                F.checked["steps"] += 1
        if times and exact is not None and (len(times) != len(exact) or any(
                abs(a - b) > half for a, b in zip(times, exact))):
            F.fail(f"{_rel(src.with_name('steps.csv'), root)} does not match the per-step lines of {_rel(src, root)}")


# ---- derived numbers: this module's own arithmetic (not aggregate.py's) -------------------------------------
# comparison.csv column -> (bench metric(s), how draws combine); the first metric with values is used
COMPARISON = {"step_s": (("step_s",), "median"), "tokens_per_s": (("tokens_per_s",), "median"),
              "peak_alloc_gb": (("peak_alloc_gb", "peak_rss_gb"), "max"),
              "mem_after_load_gb": (("alloc_after_load_gb", "rss_after_load_gb"), "median"),
              "load_s": (("load_s",), "median"), "expert_lora_params": (("expert_lora_params",), "median"),
              "expert_4bit_fraction": (("expert_weights_4bit_fraction",), "median")}


def arm_cells(rows: list[dict]) -> dict:
    """One arm's comparison cells from its bench numbers."""
    steps = [r for r in rows if r["metric"] == "step_s" and r["status"] in VALUED]
    if not steps:
        return {"draws": 0.0}
    vals = [r["value"] for r in steps]
    out = {"draws": float(len(steps)), "step_s_iqr": _median([r.get("spread") or 0.0 for r in steps]),
           "draw_range_s": max(vals) - min(vals)}
    for col, (metrics, how) in COMPARISON.items():
        for m in metrics:
            xs = [r["value"] for r in rows if r["metric"] == m and r["status"] in VALUED]
            if xs:
                out[col] = max(xs) if how == "max" else _median(xs)
                break
    return out


def check_derived(doc: dict, F: Findings) -> None:
    """comparison.csv's medians and the speedups (baseline median step_s / arm median step_s), recomputed from the
    provenance's bench numbers (each already checked against its log)."""
    numbers = doc.get("numbers") or []
    by_arm: dict[str, list[dict]] = {}
    for n in numbers:
        if n.get("stage") == "bench":
            by_arm.setdefault(n["arm"], []).append(n)
    cells = {arm: arm_cells(rows) for arm, rows in by_arm.items()}
    for n in numbers:
        if n.get("stage") == "comparison":
            got = cells.get(n["arm"], {}).get(n["metric"])
        elif n.get("stage") == "compare" and n["metric"].startswith("speedup_vs_"):
            base = n["metric"].removeprefix("speedup_vs_")
            a, b = cells.get(n["arm"], {}).get("step_s"), cells.get(base, {}).get("step_s")
            got = b / a if a and b else None
        else:
            continue
        if got is None or n.get("value") is None or not math.isclose(got, n["value"], rel_tol=1e-9, abs_tol=1e-12):
            F.fail(f"derived number {n['id']} = {n.get('value')!r}: recomputed from the checked rows it is {got!r}")
        else:
            F.checked["derived"] += 1


def check_inputs(doc: dict, root: Path, F: Findings) -> None:
    """Re-hash every input the provenance names. A file absent by design (model weights are not committed) is
    noted, not failed; one that is here and differs is a failure."""
    inputs = doc.get("inputs", {})
    files = [(k, v) for k, v in inputs.items() if isinstance(v, dict) and "sha256" in v and "path" in v]
    files += [(f"env {k}", v) for k, v in (doc.get("environment", {}).get("arms") or {}).items()]
    if isinstance((inputs.get("model") or {}).get("fingerprint"), dict):
        files.append(("model fingerprint", inputs["model"]["fingerprint"]))
    data_dir = Path(inputs.get("data", {}).get("path", "")).parent
    files += [(f"data {name}", {"path": str(data_dir / name), "sha256": sha})
              for name, sha in (inputs.get("data", {}).get("files") or {}).items()]
    for key, v in files:
        p = root / v["path"]
        if not p.is_file():
            F.warn(f"input {key}: {v['path']} not present here; not re-hashed")
            continue
        got = sha256_file(p)
        if got != v["sha256"]:
            F.fail(f"input {key}: {v['path']} changed since the provenance was written "
                   f"(sha256 {v['sha256'][:16]} -> {got[:16]})")
        else:
            F.checked["inputs"] += 1


# ---- one run, all runs -------------------------------------------------------------------------------------
def audit_run(run_dir: Path, s: dict, root: Path, check_calendars: bool = True) -> tuple[Findings, dict]:
    F = Findings()
    prov = run_dir / "provenance.json"
    info = {"run": run_dir.name, "provenance": str(prov)}
    if not prov.is_file():
        F.fail(f"{prov} is missing: run `snakemake provenance` for this run")
        return F, info
    data = prov.read_bytes()
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as exc:
        F.fail(f"{prov} is not valid JSON ({exc}); it was damaged after it was written")
        doc = {}
    info.update(sha256=sha256_bytes(data), revision=doc.get("revision"), numbers=len(doc.get("numbers") or []))
    hist = history_dir(s["history"], doc.get("run") or run_dir.name)
    chain = check_chain(prov, data, doc, hist, F)
    info["chain"] = check_stamps(chain, hist, prov, run_dir, s, F, check_calendars)
    if doc:
        check_numbers(doc, run_dir, root, F)
        check_metrics_csv(doc, run_dir, F)
        check_steps(doc, root, run_dir, F)
        check_derived(doc, F)
        check_inputs(doc, root, F)
    info["level"] = F.level
    return F, info


def summary_line(level: str, results: list[tuple[Findings, dict]]) -> str:
    per_run = ", ".join(f"{info['run']} {info['level']}" for _, info in results)
    nfail = sum(len(F.failed) for F, _ in results)
    meaning = {"PROVEN": "every required revision's proof verified against a Bitcoin node",
               "ATTESTED": "complete proofs NOT checked against a Bitcoin node (unverified)",
               "PENDING": "numbers, chain and inputs check out; a proof awaits its Bitcoin block",
               "UNSTAMPED": "numbers, chain and inputs check out; a required revision has no proof yet",
               "FAILED": f"{nfail} failure(s)"}[level]
    return f"AUDIT {level}: {meaning} ({len(results)} run(s): {per_run})"


def render(date: str, level: str, results: list[tuple[Findings, dict]], s: dict, argv: list[str]) -> str:
    out = [f"# Audit {date}", "", f"**{level}** — {summary_line(level, results)}.", "",
           f"Command: `python -m moebench.audit {_redact(' '.join(argv))}`  ",
           f"Bitcoin node: {_redact(s.get('bitcoin_node')) or 'none (complete proofs can be ATTESTED at best)'}; "
           f"calendar timeout {s['timeout_s']} s.", "",
           "Levels: PROVEN (exit 0) > ATTESTED (3) > PENDING (4) > UNSTAMPED (5) > FAILED (1); below FAILED every "
           "number, row, the chain and the inputs checked out.", ""]
    for F, info in results:
        c = F.checked
        out += [f"## Run `{info['run']}`: {info['level']}", "",
                f"- `{info['provenance']}` sha256 `{info.get('sha256')}`, revision {info.get('revision')}, "
                f"{info.get('numbers')} numbers",
                f"- re-derived from logs: {c['numbers']}; stage logs scanned: {c['logs']}; step medians and "
                f"spreads recomputed: {c['steps']}; derived recomputed: {c['derived']}; inputs re-hashed: "
                f"{c['inputs']}; revisions checked: {c['revisions']}", "",
                "| revision | sha256 | stamp |", "|---|---|---|"]
        for r in info.get("chain", []):
            extra = f" (block {r['bitcoin'][0]})" if r.get("bitcoin") else ""
            out.append(f"| {r['revision']} | `{r['sha256']}` | {r['stamp']}{extra} |")
        out += ["", "Findings:", ""] + [f"- **{lvl}** {m}" for lvl, m in F.items] + [""]
    return "\n".join(out)


def write_report(out_dir: Path, date: str, text: str) -> Path:
    """audits/AUDIT-<date>.md; a different audit of the same day gets -2, -3 ... (none is overwritten)."""
    k = 1
    while True:
        p = out_dir / (f"AUDIT-{date}.md" if k == 1 else f"AUDIT-{date}-{k}.md")
        if not p.exists() or p.read_text() == text:
            atomic_write(p, text)
            return p
        k += 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results", help="directory of runs (default %(default)s)")
    ap.add_argument("--run", action="append", help="audit only this run (repeat); default: every run with a "
                                                   "provenance.json")
    ap.add_argument("--config", help="config.yaml with the `provenance:` block")
    ap.add_argument("--settings", help="the `provenance:` block as JSON (over --config; the workflow passes it)")
    ap.add_argument("--history")
    ap.add_argument("--bitcoin-node", help="run `ots verify` of complete proofs against this node")
    ap.add_argument("--timeout", type=float, dest="timeout_s")
    ap.add_argument("--whitelist", "-l", action="append", help="extra calendar the audit may ask about pending "
                                                              "proofs (the configured calendars always are)")
    ap.add_argument("--allow-unstamped", action="store_true", help=argparse.SUPPRESS)  # levels replaced it
    ap.add_argument("--no-calendars", action="store_true", help="do not ask calendars about pending proofs")
    ap.add_argument("--out-dir", default="audits")
    ap.add_argument("--level-file", help="also write the summary line here")
    ap.add_argument("--date", help=argparse.SUPPRESS)
    ap.add_argument("--log")
    a = ap.parse_args(argv)
    log = logger("audit", a.log)
    try:
        cli = {"history": a.history, "bitcoin_node": a.bitcoin_node, "timeout_s": a.timeout_s}
        s = settings(a.config, **{**(json.loads(a.settings) if a.settings else {}),
                                  **{k: v for k, v in cli.items() if v is not None}})
        s["whitelist"] = list(s["whitelist"]) + (a.whitelist or [])
    except (OSError, ValueError) as exc:
        log.error("audit: cannot read the provenance settings (%s): %s", a.config or a.settings, exc)
        return 2
    base = Path(a.results)
    runs = [base / r for r in a.run] if a.run else sorted(p.parent for p in base.glob("*/provenance.json"))
    if not runs:
        log.error("audit: no run with a provenance.json under %s: run `snakemake provenance` first", base)
        return 2
    results = [audit_run(r, s, Path("."), not a.no_calendars) for r in runs]
    level = worst(info["level"] for _, info in results)
    date = a.date or datetime.now(timezone.utc).date().isoformat()
    path = write_report(Path(a.out_dir), date, render(date, level, results, s, argv))
    for F, info in results:
        for m in F.failed:
            log.error("FAIL [%s] %s", info["run"], m)
    line = summary_line(level, results)
    if a.level_file:
        atomic_write(a.level_file, f"{level}\n{line}\nreport: {path}\n")
    log.info("%s: %s", path, line)
    print(line)
    return EXIT[level]


if __name__ == "__main__":
    sys.exit(main())
