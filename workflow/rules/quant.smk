# Unsloth's 4-bit GPT-OSS class reads a per-expert bnb-4bit layout: made once per model build, and checked
# against the bf16 model (routers, biases, expert and MoE outputs; a scrambled-expert control must fail) before
# unsloth_4bit is timed on it.
def bnb4_check(wildcards):
    cfg = RUNS[wildcards.run]
    if wildcards.arm != "unsloth_4bit" or cfg["model"]["name"] != "gpt-oss-20b" or wl.gpu_jobs(cfg) == 0:
        return []
    return [f"results/{wildcards.run}/model-unsloth-bnb4.check.json"]


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
