rule model:
    input:
        config=CONFIG,
        tier=f"{R}/tier.json",
    output:
        model=directory(f"{R}/model"),
        sha=f"{R}/model.sha256",
    conda:
        "../../environment.yml"
    log:
        f"{R}/logs/model.log",
    resources:
        gpu=GPU,
        mem_mb=wl.mem_mb(config, "model"),
        runtime=60,
    shell:
        "python -m moebench.models --config {input.config} --tier {input.tier} --out {output.model} --sha {output.sha}"
        " --log {log}"
