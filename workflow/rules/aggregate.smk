rule aggregate:
    input:
        run_config=ancient(RUN_CONFIG),  # made by rule run_config; its rewrite alone reruns nothing
        draws=draws,
        gates=lambda w: [f"results/{w.run}/validate/{arm}/gates.json" for arm in wl.validate_arms(RUNS[w.run])],
        model_sha=f"{R}/model.sha256",  # its router calibration record becomes `model` rows
    output:
        metrics=f"{R}/metrics.csv",
        comparison=report(f"{R}/comparison.csv", category="Throughput", subcategory="{run}",
                          caption="../report/comparison.rst", labels={"run": "{run}", "table": "comparison"}),
        markdown=f"{R}/comparison.md",
        verdict=f"{R}/verdict.json",
    params:
        config=CONFIG,
        settings=wl.per_run(config, wl.settings, "aggregate"),  # rerun when these settings change
    conda:
        "../../environment.yml"
    log:
        f"{R}/logs/aggregate.log",
    shell:
        "python -m moebench.aggregate --config {params.config} --inputs {input.draws} --metrics {output.metrics}"
        " --gates {input.gates} --model-sha {input.model_sha} --comparison {output.comparison} --markdown {output.markdown} --verdict {output.verdict} > {log}"
