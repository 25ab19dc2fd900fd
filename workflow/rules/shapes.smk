# The shape curve: one short measurement per shape (config shape_curve.shapes), each a fresh bench process, for the
# arms in shape_curve.arms; single draws beside the tier-shape verdict, never under it.
rule shape_curve:
    input:
        run_config=ancient(RUN_CONFIG),  # made by rule run_config; its rewrite alone reruns nothing
        tier=f"{R}/tier.json",
        model=f"{R}/model",
        train=f"{R}/data/train.jsonl",
        bnb4=bnb4_check,  # unsloth_4bit on GPT-OSS (GPU): the checked pre-quantized checkpoint
        fp8=fp8_checkpoint,  # unsloth_fp8 (GPU): the prebuilt FP8 checkpoint (recipe.smk)
    output:
        f"{R}/shapes/{{arm}}.csv",
    params:
        config=CONFIG,
        settings=wl.per_run(config, wl.settings, "shape_curve"),  # rerun when these settings change
        extra="",  # recipe_point's stage, shapes and draw
    conda:
        "../../environment.yml"
    log:
        # each shape's process writes its run.log/steps.csv in shapes/{arm}_<B>x<S>/ beside this log
        f"{R}/shapes/{{arm}}.log",
    resources:
        gpu=GPU,
        mem_mb=wl.per_run(config, wl.mem_mb, "bench"),
        runtime=60,
        **TIER_RES,
    shell:
        # every input checked against its recorded hash first: a truncated or edited file stops the job, named
        "python -m moebench.inputs verify --data {input.train} --model {input.model} --prequant {input.bnb4} && "
        "python -m moebench.shape_curve --config {params.config} --tier {input.tier} --model {input.model}"
        " --data {input.train} --arm {wildcards.arm} --out {output} --log {log} {params.extra}"


# The settings the recipe asked to measure (config recipe.points, "ARM:BxS"): each draw of an arm runs all its
# points through the shape curve's code, one fresh bench process per point (stage `point`, its own draw number).
use rule shape_curve as recipe_point with:
    output:
        f"{R}/points/{{arm}}_d{{draw}}.csv",
    params:
        config=CONFIG,
        settings=wl.per_run(config, wl.settings, "shape_curve"),  # rerun when these settings change
        extra=lambda w: f"--stage point --shapes {','.join(wl.recipe_points(RUNS[w.run])[w.arm])} --draw {w.draw}",
    log:
        # each point's process writes its run.log/console.log in points/{arm}_d{draw}_<B>x<S>/ beside this log
        f"{R}/points/{{arm}}_d{{draw}}.log",
    wildcard_constraints:
        arm="[a-z0-9_]+",
        draw=r"\d+",
