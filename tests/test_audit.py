"""The audit as a user types it, on a fresh clone: `snakemake audit` plans no rebuild of a committed run (its weights
are absent by design), prints the level reached and writes it to a file, and fails only on FAILED. Offline the
committed runs read UNSTAMPED (each run's newest revision has no proof yet; older unproven revisions are marked
superseded). The audit's own median and interquartile range agree with the bench's (statistics.quantiles)."""
from __future__ import annotations

import random
import statistics

import pytest

from conftest import BACKGROUND_NICE, background, copy_repo, snakemake
from moebench import audit


@background("audited")
def audited(tmp_path_factory):
    """A fresh clone, the dry runs of `audit` and `ots_upgrade`, then `snakemake audit` as typed, in that order,
    run beside the other tests. Returns (clone, {target: dry run's Ran}, the audit's Ran)."""
    clone = copy_repo(tmp_path_factory.mktemp("clone"))
    dry = {target: snakemake(clone, "-n", target, nice=BACKGROUND_NICE) for target in ("audit", "ots_upgrade")}
    # no --cores: the default profile gives them
    return clone, dry, snakemake(clone, "audit", timeout=300, nice=BACKGROUND_NICE)


def test_dry_run_audit_plans_only_the_audit(audited):
    for target, r in audited[1].items():
        assert r.returncode == 0, r.stderr[-2000:]
        stats = r.stdout.split("Job stats:")[1].split("Reasons")[0] if "Job stats:" in r.stdout else r.stdout
        assert f"{target} " in stats and "total" in stats
        for rule in ("model", "bench", "detect", "data", "validate", "aggregate", "provenance", "run_config"):
            assert f"\n{rule} " not in stats, (target, stats)


def test_snakemake_audit_as_typed_reads_unstamped_offline(audited):
    clone, _, r = audited
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "AUDIT UNSTAMPED: numbers, chain and inputs check out" in out
    level = (clone / "audits" / "level.txt").read_text()
    assert level.startswith("UNSTAMPED\n") and "FAILED" not in level
    report = sorted((clone / "audits").glob("AUDIT-*.md"))[-1].read_text()
    assert "| superseded |" in report and "**FAIL**" not in report
    assert not (clone / "results" / "local").exists()  # nothing was built


def test_median_and_iqr_match_the_bench_summary():
    rng = random.Random(7)
    for n in (1, 2, 3, 4, 5, 6, 7, 20, 21):
        xs = [rng.uniform(0.1, 2.0) for _ in range(n)]
        q = statistics.quantiles(xs, n=4, method="inclusive") if n > 1 else [xs[0]] * 3
        assert audit._median(xs) == pytest.approx(statistics.median(xs), abs=1e-15)
        assert audit._iqr(xs) == pytest.approx(q[2] - q[0], abs=1e-12)
