"""Audit the provenance of every run: re-derive each number from its raw log, recompute the derived ones with this
package's own arithmetic, check the hash chain back to the first revision, check the OpenTimestamps proofs, re-hash
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
logs are scanned (bench, validate, offload, sweep, shape curve): a logged row the provenance lacks is a failure, and so is an
expected log (from the run's config and tier plan) that is missing. Each draw's step_s median and interquartile
range are recomputed from its per-step lines ("timed step i/n: x s", within their printed precision) and from
steps.csv where the draw wrote one; comparison medians and speedups are recomputed from the checked rows.

docs/figures.json (every results figure of README.md and docs/results.md, cross-run ratios included) is audited
like a run, as `cross-run-figures`: its own hash chain and proofs, then each figure recomputed from the provenance
ids it names; a figure on an older provenance is stale (run `make docs`).
"""
from __future__ import annotations

# One module per kind of check: levels (levels, exit codes, findings), logs (numbers against their logs), proofs
# (hash chain and OpenTimestamps proofs), recompute (medians, derived numbers, input hashes), cli (one run, all
# runs, the report, main), figures (docs/figures.json). Every name stays importable as moebench.audit.X.
from .cli import audit_run, main, render, summary_line, write_report  # noqa: F401
from .levels import EXIT, LEVELS, Findings, worst  # noqa: F401
from .logs import (CONSOLE_MORE, FIELDS, STAGE_LOGS, _rel, check_metrics_csv, check_numbers,  # noqa: F401
                   console_degraded, diff, expected_logs, parse_log, same)
from .proofs import (RANK, _readable, _redact, check_chain, check_revision_stamp, check_stamp_record,  # noqa: F401
                     check_stamps, probe_calendars, verify_complete)
from .recompute import (COMPARISON, TIMED, VALUED, _iqr, _median, _quartile, arm_cells, check_derived,  # noqa: F401
                        check_inputs, check_steps, steps_csv, timed_steps)
