rule model:
    input:
        run_config=ancient(RUN_CONFIG),  # made by rule run_config; its rewrite alone reruns nothing
        tier=f"{R}/tier.json",
    output:
        model=directory(f"{R}/model"),
        sha=f"{R}/model.sha256",
        routers=f"{R}/model.routers.safetensors",  # raw and saved router tensors, for in-process A/B
    params:
        config=CONFIG,
        settings=wl.per_run(config, wl.settings, "model"),  # rerun when these settings change
    conda:
        "../../environment.yml"
    log:
        f"{R}/logs/model.log",
    resources:
        gpu=GPU,
        mem_mb=wl.per_run(config, wl.mem_mb, "model"),
        runtime=60,
        **TIER_RES,
    shell:
        "python -m moebench.models --config {params.config} --tier {input.tier} --out {output.model} --sha {output.sha}"
        " --routers {output.routers} --log {log}"
        # the cheap fingerprint later jobs check the weights against (moebench.inputs: sizes, headers, samples)
        " && python -m moebench.inputs fingerprint --model {output.model}"
