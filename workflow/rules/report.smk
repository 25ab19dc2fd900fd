# The report: figures, tables and captions for every run in results/ (helpers in common.smk).

rule report_plots:
    input:
        _plots_input,
    output:
        throughput=_plot("Throughput", "throughput.png", "throughput", "tokens/s per arm"),
        speedup=_plot("Throughput", "speedup.png", "speedup", "speedup vs baselines"),
        shapes=_plot("Throughput", "shapes.png", "shapes", "ratio vs tokens per step"),
        routing=_plot("Throughput", "routing.png", "routing", "step time vs expert load"),
        memory=_plot("Memory", "memory.png", "memory", "peak memory vs card"),
        frontier=_plot("Offload", "frontier.png", "frontier", "memory/speed frontier"),
        energy=_plot("Energy", "energy.png", "energy", "J/token"),
        loss=_plot("Training", "loss.png", "loss", "loss curves"),
        gates=_plot("Training", "gates.html", "gates", "gate table and verdict"),
        metrics=_plot("Provenance", "metrics.html", "metrics", "every metrics.csv row"),
        sidecars=expand("results/{{run}}/plots/{name}.{ext}", ext=["json", "caption.rst"],
                        name=["throughput", "speedup", "shapes", "routing", "memory", "frontier", "energy", "loss",
                              "gates", "metrics"]),
    params:
        baselines=" ".join(config.get("baselines", ["hf_bf16", "unsloth_4bit"])),
    wildcard_constraints:
        run=_RUN_RE,
    conda:
        "../../environment.yml"
    log:
        "results/{run}/logs/report_plots.log",
    shell:
        "python -m moebench.report run --run-dir results/{wildcards.run} --out results/{wildcards.run}/plots"
        " --baselines {params.baselines} > {log} 2>&1"


rule report_runs:
    input:
        lambda wildcards: [f for r in REPORT_RUNS for f in _run_files(r, ["metrics.csv", "tier.json", "verdict.json"])],
    output:
        tiers=report("results/_report/tiers.png", category="Throughput", subcategory="all runs (tier comparison)",
                     caption="../report/tiers.rst", labels={"run": "all", "figure": "tier comparison"}),
        sidecars=["results/_report/tiers.json", "results/_report/tiers.caption.rst"],
        summary="results/_report/summary.rst",  # the verdicts workflow.rst includes
    params:
        runs=" ".join(f"results/{r}" for r in REPORT_RUNS),
    conda:
        "../../environment.yml"
    log:
        "results/_report/report_runs.log",
    shell:
        "python -m moebench.report runs --run-dirs {params.runs} --out results/_report > {log} 2>&1"


# Provenance files are written by the provenance/stamp rules (this run) or committed (GPU runs); this rule
# only renders their status and the `ots verify` recipe into a page of the report.
rule report_provenance:
    input:
        unpack(_provenance_input),
    output:
        page=report("results/{run}/report/provenance.html", category="Provenance", subcategory="{run}",
                    caption="../report/provenance.rst", labels={"run": "{run}", "item": "stamp status"}),
        sidecars=["results/{run}/report/provenance.caption.rst", "results/{run}/report/provenance_status.json"],
    wildcard_constraints:
        run=_RUN_RE,
    conda:
        "../../environment.yml"
    log:
        "results/{run}/logs/report_provenance.log",
    shell:
        "python -m moebench.report provenance --run-dir results/{wildcards.run} --out results/{wildcards.run}/report > {log} 2>&1"


REPORT_TARGETS = (
    expand("results/{run}/plots/throughput.png", run=REPORT_RUNS)
    + expand("results/{run}/report/provenance.html", run=REPORT_RUNS)
    + ["results/_report/tiers.png"]
)
