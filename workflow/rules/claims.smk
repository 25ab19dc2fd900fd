# The claims ledger: each stack's public claims (config/claims.yaml) judged against the measured rows of every
# run the report shows, each verdict with the provenance ids it rests on. Runs on the submitting host (it reads
# tables, no GPU).
#
# This invocation's runs write results/<run>/claims.json: part of the run, recorded in its provenance.json.
# A committed run's claims.json is what its provenance recorded (judged against the ledger of that day) and is never
# rewritten here: the report re-judges committed runs against today's ledger into results/<run>/report/ (not
# committed), so editing the ledger cannot change a committed run's files or break its audit.
_CLAIMS_CMD = ("python -m moebench.claims --ledger {input.ledger} --run-dir results/{wildcards.run}"
               " --out-json {output.json} --out-md {output.md} --out-html {output.page} --out-caption {output.caption}"
               " --log {log}")


localrules:
    claims,
    claims_committed,


rule claims:
    input:
        ledger="config/claims.yaml",
        run=lambda wildcards: _run_files(wildcards.run, ["metrics.csv", "tier.json"]),
    output:
        json="results/{run}/claims.json",
        md="results/{run}/claims.md",
        page=_claims_page(),
        caption="results/{run}/report/claims.caption.rst",
    wildcard_constraints:
        run=RUN_RE,
    conda:
        "../../environment.yml"
    log:
        "results/{run}/logs/claims.log",
    shell:
        _CLAIMS_CMD


rule claims_committed:
    input:
        ledger="config/claims.yaml",
        run=lambda wildcards: _run_files(wildcards.run, ["metrics.csv", "tier.json"]),
    output:
        json="results/{run}/report/claims.json",
        md="results/{run}/report/claims.md",
        page=_claims_page(),
        caption="results/{run}/report/claims.caption.rst",
    wildcard_constraints:
        run=COMMITTED_RE,
    conda:
        "../../environment.yml"
    log:
        "results/{run}/report/claims.log",
    shell:
        _CLAIMS_CMD


CLAIMS_TARGETS = expand("results/{run}/claims.json", run=RUNS) + expand("results/{run}/report/claims.json",
                                                                      run=COMMITTED_RUNS)
