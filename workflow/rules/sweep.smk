rule sweep:
    input:
        run_config=ancient(RUN_CONFIG),  # made by rule run_config; its rewrite alone reruns nothing
        tier=f"{R}/tier.json",
        model=f"{R}/model",
        train=f"{R}/data/train.jsonl",
        bnb4=bnb4_check,  # unsloth_4bit on GPT-OSS (GPU): the checked pre-quantized checkpoint
        fp8=fp8_checkpoint,  # unsloth_fp8 (GPU): the prebuilt FP8 checkpoint (recipe.smk)
    output:
        f"{R}/sweep/{{arm}}/{{kind}}.csv",
    params:
        config=CONFIG,
        settings=wl.per_run(config, wl.settings, "bench"),  # rerun when these settings change
        capacity=wl.per_run(config, lambda c: repr(sorted((c.get("capacity") or {}).items()))),  # the ladders
    conda:
        "../../environment.yml"
    log:
        # the ladder process writes {kind}_ladder.log/.csv and each fresh probe probe_{kind}_*/ beside this log
        f"{R}/sweep/{{arm}}/{{kind}}.log",
    wildcard_constraints:
        kind="seq|batch",
    resources:
        gpu=GPU,
        mem_mb=wl.per_run(config, wl.mem_mb, "bench"),
        runtime=120,
        **TIER_RES,
    shell:
        # every input checked against its recorded hash first: a truncated or edited file stops the job, named
        "python -m moebench.inputs verify --data {input.train} --model {input.model} --prequant {input.bnb4} && "
        "python -m moebench.sweep --config {params.config} --tier {input.tier} --model {input.model}"
        " --data {input.train} --arm {wildcards.arm} --kind {wildcards.kind} --out {output} --log {log}"
