rule offload:
    input:
        run_config=ancient(RUN_CONFIG),  # made by rule run_config; its rewrite alone reruns nothing
        tier=f"{R}/tier.json",
        model=f"{R}/model",
        train=f"{R}/data/train.jsonl",
    output:
        f"{R}/offload/{{arm}}/{{mode}}/metrics.csv",
    params:
        config=CONFIG,
        settings=wl.per_run(config, wl.settings, "offload"),  # rerun when these settings change
    conda:
        "../../environment.yml"
    log:
        run=f"{R}/offload/{{arm}}/{{mode}}/run.log",
        console=f"{R}/offload/{{arm}}/{{mode}}/console.log",  # all the process printed (bench.smk says why)
    wildcard_constraints:
        mode="none|plain|unsloth|expert_offload",
    resources:
        gpu=GPU,
        mem_mb=wl.per_run(config, wl.mem_mb, "bench"),
        runtime=30,
        **TIER_RES,
    shell:
        # every input checked against its recorded hash first: a truncated or edited file stops the job, named
        "python -m moebench.inputs verify --data {input.train} --model {input.model} && "
        "python -m moebench.offload --config {params.config} --tier {input.tier} --model {input.model}"
        " --data {input.train} --arm {wildcards.arm} --mode {wildcards.mode} --out {output} --log {log.run} 2>&1 | tee {log.console}"
