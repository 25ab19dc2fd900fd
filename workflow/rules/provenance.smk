# Provenance: every number of the run under a stable id with its source log's sha256, in a hash chain of
# revisions (kept in the history dir), stamped with OpenTimestamps. `stamp` finishes within its timeout offline
# and records the stamp as unreachable; `ots_upgrade` and `audit` are run by name (`snakemake ots_upgrade`).
# All four run on the submitting host: cluster nodes often have no internet for the calendars.
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


# ots_upgrade and audit are run by name and make no files, so they cannot take a {run} wildcard: they name the
# runs of this invocation themselves (one run, or one per tier of config `cluster.tiers`).
_PROV_RUNS = list(wl.runs(config))


# Run by name, later and online: fetches the Bitcoin attestations of every pending proof of these runs (and stamps
# the newest revision first when the calendars were unreachable before).
rule ots_upgrade:
    input:
        provenance=[f"results/{r}/provenance.json" for r in _PROV_RUNS],
    conda:
        "../../environment.yml"
    log:
        [f"results/{r}/logs/ots_upgrade.log" for r in _PROV_RUNS],
    params:
        runs=_PROV_RUNS,
    shell:
        "for r in {params.runs}; do python -m moebench.stamp upgrade --provenance results/$r/provenance.json"
        " --config results/$r/config.yaml --out results/$r/provenance_stamp.json --log results/$r/logs/ots_upgrade.log"
        " || exit 1; done"


# Run by name: re-derives every number of every run under results/ from its logs, checks the hash chains and the
# proofs; writes audits/AUDIT-<date>.md and fails when anything does not check out. The log and the `provenance:`
# settings are those of the first run (every run of one invocation shares them).
rule audit:
    input:
        provenance=[f"results/{r}/provenance.json" for r in _PROV_RUNS],
        stamp=[f"results/{r}/provenance_stamp.json" for r in _PROV_RUNS],
    params:
        config=f"results/{_PROV_RUNS[0]}/config.yaml",
        settings=wl.settings(config, "all"),  # rerun when these settings change
    conda:
        "../../environment.yml"
    log:
        f"results/{_PROV_RUNS[0]}/logs/audit.log",
    shell:
        "python -m moebench.audit --results results --config {params.config} --out-dir audits --log {log}"
