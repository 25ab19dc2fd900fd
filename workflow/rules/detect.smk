checkpoint detect:
    input:
        config=CONFIG,
    output:
        tier=f"{R}/tier.json",
    conda:
        "../../environment.yml"
    log:
        f"{R}/logs/detect.log",
    resources:
        gpu=GPU,
        runtime=10,
    shell:
        "python -m moebench.detect --config {input.config} --out {output.tier} --log {log}"
