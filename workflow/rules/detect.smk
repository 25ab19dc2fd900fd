checkpoint detect:
    input:
        run_config=ancient(RUN_CONFIG),  # made by rule run_config; its rewrite alone reruns nothing
    output:
        tier=f"{R}/tier.json",
    params:
        config=CONFIG,
        settings=wl.per_run(config, wl.settings, "detect"),  # rerun when these settings change
    conda:
        "../../environment.yml"
    log:
        f"{R}/logs/detect.log",
    resources:
        gpu=GPU,
        runtime=10,
        **TIER_RES,
    shell:
        "python -m moebench.detect --config {params.config} --out {output.tier} --log {log}"
