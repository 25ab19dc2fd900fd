# Unsloth's pre-quantized GPT-OSS checkpoint, made once per model build and checked before it is timed
# (moebench.quantcheck; bench's input function bnb4_check in common.smk makes unsloth_4bit wait for it).
rule model_bnb4:
    input:
        model=f"{R}/model",
    output:
        q=directory(f"{R}/model-unsloth-bnb4"),
        check=f"{R}/model-unsloth-bnb4.check.json",
    conda:
        "../../environment.yml"
    log:
        f"{R}/logs/model_bnb4.log",
    resources:
        gpu=GPU,
        mem_mb=wl.per_run(config, wl.mem_mb, "model"),
        runtime=30,
        **TIER_RES,
    shell:
        # a failed build or check is recorded in the check file (passed: false) and unsloth_4bit refuses it
        "python -m moebench.quantcheck --make --bf16 {input.model} --q {output.q} --out {output.check} > {log} 2>&1"
