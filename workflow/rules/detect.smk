checkpoint detect:
    output:
        tier=f"{R}/tier.json",
    params:
        config=CONFIG,
        settings=wl.settings(config, "detect"),  # rerun when these settings change
    conda:
        "../../environment.yml"
    log:
        f"{R}/logs/detect.log",
    resources:
        gpu=GPU,
        runtime=10,
    shell:
        "python -m moebench.detect --config {params.config} --out {output.tier} --log {log}"
