# Raw against calibrated routers inside one process (issue 20): one arm loaded once, the two router sets of
# model.routers.safetensors swapped in place, timed windows A B B A, for the arms of config routing_ab.arms
# (their rows reach aggregate beside the draws); any arm's results/<run>/routing_ab/<arm>/metrics.csv on request.
rule routing_ab:
    input:
        run_config=ancient(RUN_CONFIG),  # made by rule run_config; its rewrite alone reruns nothing
        tier=f"{R}/tier.json",
        model=f"{R}/model",
        routers=f"{R}/model.routers.safetensors",
        train=f"{R}/data/train.jsonl",
        bnb4=bnb4_check,  # unsloth_4bit on GPT-OSS (GPU): the checked pre-quantized checkpoint
    output:
        metrics=f"{R}/routing_ab/{{arm}}/metrics.csv",
        env=f"{R}/routing_ab/{{arm}}/env.json",
    params:
        config=CONFIG,
        settings=wl.per_run(config, wl.settings, "routing_ab"),  # rerun when these settings change
    conda:
        "../../environment.yml"
    log:
        run=f"{R}/routing_ab/{{arm}}/run.log",
        console=f"{R}/routing_ab/{{arm}}/console.log",
    wildcard_constraints:
        arm="[a-z0-9_]+",
    resources:
        gpu=GPU,
        mem_mb=wl.per_run(config, wl.mem_mb, "bench"),
        runtime=60,
        **TIER_RES,
    shell:
        "python -m moebench.inputs verify --data {input.train} --model {input.model} --prequant {input.bnb4} && "
        "python -m moebench.routing_ab --config {params.config} --tier {input.tier} --model {input.model}"
        " --routers {input.routers} --data {input.train} --arm {wildcards.arm} --out {output.metrics}"
        " --log {log.run} 2>&1 | tee {log.console}"
