rule bench:
    input:
        run_config=ancient(RUN_CONFIG),  # made by rule run_config; its rewrite alone reruns nothing
        tier=f"{R}/tier.json",
        model=f"{R}/model",
        train=f"{R}/data/train.jsonl",
        bnb4=bnb4_check,  # unsloth_4bit on GPT-OSS (GPU): the checked pre-quantized checkpoint
        fp8=fp8_checkpoint,  # unsloth_fp8 (GPU): the prebuilt FP8 checkpoint
    output:
        metrics=f"{R}/arms/{{arm}}/draw{{draw}}/metrics.csv",
        env=f"{R}/arms/{{arm}}/draw{{draw}}/env.json",
        steps=f"{R}/arms/{{arm}}/draw{{draw}}/steps.csv",  # timed steps (step, seconds, tokens); header only if none
    params:
        config=CONFIG,
        settings=wl.per_run(config, wl.settings, "bench"),  # rerun when these settings change
    conda:
        "../../environment.yml"
    log:
        run=f"{R}/arms/{{arm}}/draw{{draw}}/run.log",
        # everything the process printed, third-party libraries included (Unsloth reports what it patched,
        # compiled or fell back from only on stdout)
        console=f"{R}/arms/{{arm}}/draw{{draw}}/console.log",
    wildcard_constraints:
        arm="[a-z0-9_]+",
        draw=r"\d+",
    # draws before the shape curve, routing A/B and sweeps on one GPU: a lease that ends early keeps the rows the
    # comparison reads (sitting 4 lost a draw to the shape curve scheduled first)
    priority: 10
    resources:
        gpu=GPU,
        mem_mb=wl.per_run(config, wl.mem_mb, "bench"),
        runtime=30,
        **TIER_RES,
    shell:
        # every input checked against its recorded hash first: a truncated or edited file stops the job, named
        "python -m moebench.inputs verify --data {input.train} --model {input.model} --prequant {input.bnb4} && "
        "python -m moebench.bench --config {params.config} --tier {input.tier} --model {input.model} --data {input.train}"
        " --arm {wildcards.arm} --draw {wildcards.draw} --out {output.metrics} --log {log.run} 2>&1 | tee {log.console}"
