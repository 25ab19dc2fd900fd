"""Audit the provenance of every run: re-derive each number from its raw log, check the hash chain back to the
first revision, check the OpenTimestamps proofs, re-hash the inputs. Findings go to audits/AUDIT-<date>.md; the exit
status is 1 when anything failed (each failure is also printed: which file, which revision, which number).

A number is re-derived from the `MOEBENCH_ROW {json}` line its source log holds (metrics.log_row); the derived
numbers (comparison.csv medians, speedups, the verdict) are recomputed from those log rows with aggregate.py.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from .io import atomic_write, logger, sha256_file
from .metrics import LOG_TAG, Row
from .provenance import history_dir, number_id, read_head, resolve_source, row_id, sha256_bytes
from .stamp import StampError, proof_state, read_proof, run_ots, settings

FIELDS = ("value", "unit", "status", "reason", "n", "spread")


class Findings:
    def __init__(self):
        self.items: list[tuple[str, str]] = []
        self.checked = {"numbers": 0, "derived": 0, "inputs": 0, "revisions": 0}

    def fail(self, msg):
        self.items.append(("FAIL", msg))

    def warn(self, msg):
        self.items.append(("WARN", msg))

    def ok(self, msg):
        self.items.append(("OK", msg))

    @property
    def failed(self):
        return [m for lvl, m in self.items if lvl == "FAIL"]


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


def diff(number: dict, row: dict) -> list[str]:
    return [f"{f}: provenance {number.get(f)!r} vs log {row.get(f)!r}" for f in FIELDS
            if not same(number.get(f), row.get(f))]


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
    if chain and not F.failed:
        F.ok(f"hash chain intact: {len(chain)} revision(s), newest {chain[0][1][:16]}")
    return chain


def _redact(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//***@", url or "")


def probe_calendars(proof_path: Path, s: dict, F: Findings, label: str) -> None:
    """Ask each pending calendar (only whitelisted ones) whether the Bitcoin attestation is ready."""
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
            F.fail(f"{label}: calendar {uri} {kind}; the proof stays pending until it answers")


def check_stamps(chain, hist: Path, prov: Path, s: dict, F: Findings, check_calendars: bool) -> list[dict]:
    rows = []
    for rev, sha in chain:
        label = f"revision {rev} ({sha[:16]})"
        proof = hist / f"{sha}.json.ots"
        rec_path = hist / f"{sha}.stamp.json"
        rec = json.loads(rec_path.read_text()) if rec_path.is_file() else {}
        if not proof.is_file():
            why = f"last attempt {rec.get('attempted')}: {rec.get('status')} — {rec.get('reason')}" if rec else \
                "never stamped"
            (F.fail if s["require_stamp"] else F.warn)(f"{label} has no OpenTimestamps proof ({proof} missing; "
                                                        f"{why}); run `snakemake ots_upgrade` with internet")
            rows.append({"revision": rev, "sha256": sha, "stamp": "missing"})
            continue
        try:
            st = proof_state(proof)
        except StampError as exc:
            F.fail(f"{label}: {exc}")
            continue
        if st["digest"] != sha:
            F.fail(f"{label}: {proof} proves another file (digest {st['digest'][:16]})")
            continue
        rows.append({"revision": rev, "sha256": sha, "stamp": st["status"],
                     "bitcoin": [b["height"] for b in st["bitcoin"]], "pending": st["pending"]})
        if st["status"] == "complete" and s.get("bitcoin_node"):
            args = ["--no-cache", "--bitcoin-node", s["bitcoin_node"], "verify", "-f", str(hist / f"{sha}.json"),
                    str(proof)]
            rc, out = run_ots(args, timeout=3 * float(s["timeout_s"]) + 10)
            if rc == 0:
                F.ok(f"{label}: `ots verify` passed against {_redact(s['bitcoin_node'])}: {out.strip()[-120:]}")
            else:
                F.fail(f"{label}: `ots verify` failed (exit {rc}): {out.strip()[-400:]}")
        elif st["status"] == "complete":
            F.warn(f"{label}: complete proof (Bitcoin block {st['bitcoin'][0]['height']}); not checked against a "
                   "node here (set provenance.bitcoin_node or pass --bitcoin-node)")
        elif check_calendars:
            probe_calendars(proof, s, F, label)
        else:
            F.warn(f"{label}: proof still pending at {', '.join(st['pending'])}")
    here = Path(f"{prov}.ots")
    if here.is_file() and chain:
        try:
            d = proof_state(here)["digest"]
            if d != sha256_file(prov):
                F.fail(f"{here} proves a different file than {prov}: the provenance changed after it was stamped")
        except StampError as exc:
            F.fail(str(exc))
    return rows


# ---- numbers -----------------------------------------------------------------------------------------------
def check_numbers(doc: dict, run_dir: Path, root: Path, F: Findings) -> list[Row]:
    """Every number of a log against that log; every log row must be in the provenance. Returns the log rows."""
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
        if src not in logs:
            logs[src] = parse_log(src, F)
            got = sha256_file(src)
            if got != n.get("source_sha256"):
                F.fail(f"{src} changed since the provenance was written (sha256 {n.get('source_sha256', '')[:16]} "
                       f"-> {got[:16]})")
        row = logs[src].get(nid)
        if row is None:
            F.fail(f"number {nid} = {n.get('value')!r}: not in its source log {src}")
            continue
        bad = diff(n, asdict(row))
        if bad:
            F.fail(f"number {nid}: does not match its source log {src}: " + "; ".join(bad))
        else:
            F.checked["numbers"] += 1
    for log in sorted(run_dir.glob("arms/*/draw*/run.log")):
        if log not in logs and log.resolve() not in {p.resolve() for p in logs}:
            logs[log] = parse_log(log, F)
    for src, rows in logs.items():
        for rid in rows:
            if rid not in ids:
                F.fail(f"{src}: logged number {rid} is missing from the provenance")
    return [r for rows in logs.values() for r in rows.values()]


def check_metrics_csv(doc: dict, run_dir: Path, F: Findings) -> None:
    from .metrics import read_rows

    path = run_dir / "metrics.csv"
    if not path.is_file():
        F.warn(f"{path} not present; numbers checked against the logs only")
        return
    by_id = {n["id"]: n for n in doc.get("numbers", [])}
    for r in read_rows(path):
        n = by_id.get(row_id(r))
        if n is None:
            F.fail(f"{path}: row {row_id(r)} is missing from the provenance")
        elif diff(n, asdict(r)):
            F.fail(f"{path}: row {row_id(r)} differs from the provenance: " + "; ".join(diff(n, asdict(r))))


def check_derived(doc: dict, rows: list[Row], F: Findings) -> None:
    """Recompute comparison medians, speedups and the verdict from the log rows with the workflow's own code."""
    try:
        from . import aggregate
    except ImportError as exc:
        F.warn(f"derived numbers not recomputed: aggregate.py not importable ({exc})")
        return
    cfg = (doc.get("inputs", {}).get("config") or {}).get("content") or {}
    arms, bases = cfg.get("arms") or sorted({r.arm for r in rows}), cfg.get("baselines") or []
    lines, derived = aggregate.compare(rows, arms, bases)
    by_arm = {l["arm"]: l for l in lines}
    want = {row_id(r): r.value for r in derived}
    for n in doc.get("numbers", []):
        if n.get("stage") == "comparison":
            got = (by_arm.get(n["arm"]) or {}).get(n["metric"])
        elif n.get("stage") == "compare":
            got = want.get(n["id"])
        else:
            continue
        if got is None or not same(float(got), n.get("value")):
            F.fail(f"derived number {n['id']} = {n.get('value')!r}: recomputed from the logs it is {got!r}")
        else:
            F.checked["derived"] += 1
    for rid in want:
        if rid not in {n["id"] for n in doc.get("numbers", [])}:
            F.fail(f"derived number {rid} (recomputed from the logs) is missing from the provenance")
    verdict = (doc.get("inputs", {}).get("verdict") or {}).get("content")
    if verdict and "verdict" in cfg:
        v = aggregate.verdict(by_arm, cfg["verdict"]["min_speedup"])
        # the speed part is recomputed from the logs; training gates join it later (validate.overall_verdict)
        speed = verdict.get("speed_verdict", verdict.get("verdict"))
        if v["verdict"] != speed or not same(v.get("speedup"), verdict.get("speedup")):
            F.fail(f"speed verdict {speed!r} (speedup {verdict.get('speedup')}): recomputed from the logs "
                   f"it is {v['verdict']!r} (speedup {v.get('speedup')})")
        else:
            F.checked["derived"] += 1


def check_inputs(doc: dict, root: Path, F: Findings) -> None:
    inputs = doc.get("inputs", {})
    files = [(k, v) for k, v in inputs.items() if isinstance(v, dict) and "sha256" in v and "path" in v]
    files += [(f"env {k}", v) for k, v in (doc.get("environment", {}).get("arms") or {}).items()]
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
    info["chain"] = check_stamps(chain, hist, prov, s, F, check_calendars)
    if doc:
        rows = check_numbers(doc, run_dir, root, F)
        check_metrics_csv(doc, run_dir, F)
        check_derived(doc, rows, F)
        check_inputs(doc, root, F)
    return F, info


def render(date: str, results: list[tuple[Findings, dict]], s: dict, argv: list[str]) -> str:
    nfail = sum(len(F.failed) for F, _ in results)
    verdict = "FAIL" if nfail else "PASS"
    out = [f"# Audit {date}", "", f"**{verdict}** — {nfail} failure(s) over {len(results)} run(s).",
           "", f"Command: `python -m moebench.audit {_redact(' '.join(argv))}`  ",
           f"Stamps required: {s['require_stamp']}; Bitcoin node: {_redact(s.get('bitcoin_node')) or 'none'}; "
           f"calendar timeout {s['timeout_s']} s.", ""]
    for F, info in results:
        c = F.checked
        out += [f"## Run `{info['run']}`: {'FAIL' if F.failed else 'PASS'}", "",
                f"- `{info['provenance']}` sha256 `{info.get('sha256')}`, revision {info.get('revision')}, "
                f"{info.get('numbers')} numbers",
                f"- re-derived from logs: {c['numbers']}; derived recomputed: {c['derived']}; inputs re-hashed: "
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
    ap.add_argument("--history")
    ap.add_argument("--bitcoin-node", help="run `ots verify` of complete proofs against this node")
    ap.add_argument("--timeout", type=float, dest="timeout_s")
    ap.add_argument("--whitelist", "-l", action="append", help="extra calendar the audit may ask about pending "
                                                              "proofs (the configured calendars always are)")
    ap.add_argument("--allow-unstamped", action="store_true", help="a missing proof is a warning, not a failure")
    ap.add_argument("--no-calendars", action="store_true", help="do not ask calendars about pending proofs")
    ap.add_argument("--out-dir", default="audits")
    ap.add_argument("--date", help=argparse.SUPPRESS)
    ap.add_argument("--log")
    a = ap.parse_args(argv)
    log = logger("audit", a.log)
    try:
        s = settings(a.config, history=a.history, bitcoin_node=a.bitcoin_node, timeout_s=a.timeout_s)
        s["whitelist"] = list(s["whitelist"]) + (a.whitelist or [])
    except (OSError, ValueError) as exc:
        log.error("audit: cannot read %s: %s", a.config, exc)
        return 2
    if a.allow_unstamped:
        s["require_stamp"] = False
    base = Path(a.results)
    runs = [base / r for r in a.run] if a.run else sorted(p.parent for p in base.glob("*/provenance.json"))
    if not runs:
        log.error("audit: no run with a provenance.json under %s: run `snakemake provenance` first", base)
        return 2
    results = [audit_run(r, s, Path("."), not a.no_calendars) for r in runs]
    date = a.date or datetime.now(timezone.utc).date().isoformat()
    path = write_report(Path(a.out_dir), date, render(date, results, s, argv))
    fails = [(info["run"], m) for F, info in results for m in F.failed]
    for run, m in fails:
        log.error("FAIL [%s] %s", run, m)
    log.info("%s: %s (%d failure(s))", path, "FAIL" if fails else "PASS", len(fails))
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
