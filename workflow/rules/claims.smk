# The claims ledger: each stack's public claims (config/claims.yaml) judged against the measured rows of every
# run the report shows (this run and the committed GPU runs): holds / does not hold / not testable here, each
# verdict with the provenance ids it rests on. Runs on the submitting host (it reads tables, no GPU).


localrules:
    claims,


rule claims:
    input:
        ledger="config/claims.yaml",
        run=lambda wildcards: _run_files(wildcards.run, ["metrics.csv", "tier.json"]),
    output:
        json="results/{run}/claims.json",
        md="results/{run}/claims.md",
        page=report("results/{run}/report/claims.html", category="Claims", subcategory="{run}",
                    caption="../report/claims.rst", labels={"run": "{run}", "item": "claims ledger"}),
        caption="results/{run}/report/claims.caption.rst",
    wildcard_constraints:
        run=_RUN_RE,
    conda:
        "../../environment.yml"
    log:
        "results/{run}/logs/claims.log",
    shell:
        "python -m moebench.claims --ledger {input.ledger} --run-dir results/{wildcards.run}"
        " --out-json {output.json} --out-md {output.md} --out-html {output.page} --out-caption {output.caption}"
        " --log {log}"


CLAIMS_TARGETS = expand("results/{run}/claims.json", run=REPORT_RUNS)
