# Provenance: every number of the run under a stable id with its source log's sha256, in a hash chain of
# revisions (kept in the history dir), stamped with OpenTimestamps. `stamp` finishes within its timeout offline
# and records the stamp as unreachable; `ots_upgrade` and `audit` are run by name (`snakemake ots_upgrade`).
# All four run on the submitting host: cluster nodes often have no internet for the calendars.
import glob
import json
import os

OTS_HISTORY = config.get("provenance", {}).get("history", "audits/.ots-history")


localrules:
    provenance,
    stamp,
    ots_upgrade,
    audit,


rule provenance:
    input:
        run_config=ancient(RUN_CONFIG),  # made by rule run_config; its rewrite alone reruns nothing
        metrics=f"{R}/metrics.csv",
        tier=f"{R}/tier.json",
        data=f"{R}/data/data.sha256",
        model=f"{R}/model.sha256",
        comparison=f"{R}/comparison.csv",
        verdict=f"{R}/verdict.json",
        claims=f"{R}/claims.json",
    output:
        json=f"{R}/provenance.json",
        md=f"{R}/PROVENANCE.md",
    conda:
        "../../environment.yml"
    log:
        f"{R}/logs/provenance.log",
    params:
        config=CONFIG,
        settings=wl.per_run(config, wl.settings, "all"),  # rerun when these settings change
        run_dir=lambda wildcards, input: os.path.dirname(input.metrics),
        history=OTS_HISTORY,
    shell:
        "python -m moebench.provenance --run-dir {params.run_dir} --config {params.config}"
        " --metrics {input.metrics} --tier {input.tier} --data-sha {input.data} --model-sha {input.model}"
        " --comparison {input.comparison} --verdict {input.verdict} --claims {input.claims} --history {params.history}"
        " --out-json {output.json} --out-md {output.md} --log {log}"


rule stamp:
    input:
        run_config=ancient(RUN_CONFIG),  # made by rule run_config; its rewrite alone reruns nothing
        provenance=f"{R}/provenance.json",
    output:
        f"{R}/provenance_stamp.json",
    params:
        config=CONFIG,
        settings=wl.per_run(config, wl.settings, "stamp"),  # rerun when these settings change
    conda:
        "../../environment.yml"
    log:
        f"{R}/logs/stamp.log",
    shell:
        "python -m moebench.stamp stamp --provenance {input.provenance} --config {params.config} --out {output}"
        " --log {log}"


# ots_upgrade and audit are run by name, take no inputs and make no files, so they plan no other job (a committed
# run's weights are absent by design: nothing is rebuilt). They cover every run under results/ with a provenance.json
# (this invocation's, once built, and the committed ones), with this invocation's `provenance:` settings.
_PROV_RUNS = sorted(os.path.basename(os.path.dirname(p)) for p in glob.glob("results/*/provenance.json"))
_PROV_SETTINGS = json.dumps(config.get("provenance") or {}, sort_keys=True)


# Run by name, later and online: stamps each run's newest revision if the calendars were unreachable before, marks
# older unproven revisions superseded (once), and fetches the Bitcoin attestation of every pending proof.
rule ots_upgrade:
    conda:
        "../../environment.yml"
    log:
        "audits/ots_upgrade.log",
    params:
        runs=_PROV_RUNS,
        settings=_PROV_SETTINGS,
    shell:
        "for r in {params.runs}; do python -m moebench.stamp upgrade --provenance results/$r/provenance.json"
        " --settings {params.settings:q} --out results/$r/provenance_stamp.json --log results/$r/logs/ots_upgrade.log"
        " || exit 1; done; if [ -f docs/figures.json ]; then python -m moebench.stamp upgrade --provenance"
        " docs/figures.json --settings {params.settings:q} --out docs/figures.stamp.json --log audits/figures-stamp.log"
        " || exit 1; fi; echo 'ots_upgrade: {params.runs} docs/figures.json' > {log}"


# Run by name: re-derives every number of every run under results/ from its logs, checks the hash chains and the
# proofs; writes audits/AUDIT-<date>.md, prints the level reached and writes it to audits/level.txt (levels and
# their exit codes: moebench/audit/). Fails only on FAILED: PROVEN, ATTESTED, PENDING and UNSTAMPED each say
# how far the proofs go, with every number checked.
rule audit:
    params:
        settings=_PROV_SETTINGS,
        level="audits/level.txt",
    conda:
        "../../environment.yml"
    log:
        "audits/audit.log",
    shell:
        "rc=0; python -m moebench.audit --results results --settings {params.settings:q} --out-dir audits"
        " --level-file {params.level} --log {log} || rc=$?; test $rc -ne 1 -a $rc -ne 2"
