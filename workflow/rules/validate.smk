# Training validation: a real LoRA fine-tune per arm (TRL SFTTrainer) judged by quality gates (finite loss and
# gradients, training and held-out loss fall, every expert LoRA tensor gets a gradient, the saved adapter reloads
# to the same logits), with router load per expert. An arm that cannot run here writes skipped rows.
VALIDATE_TIMEOUT_S = config.get("validate", {}).get("timeout_s", 3600)


rule validate:
    input:
        run_config=ancient(RUN_CONFIG),  # made by rule run_config; its rewrite alone reruns nothing
        tier=f"{R}/tier.json",
        model=f"{R}/model",
        train=f"{R}/data/train.jsonl",
        heldout=f"{R}/data/heldout.jsonl",
    output:
        metrics=f"{R}/validate/{{arm}}/metrics.csv",
        loss=f"{R}/validate/{{arm}}/loss.csv",
        gates=f"{R}/validate/{{arm}}/gates.json",
        router=f"{R}/validate/{{arm}}/router.csv",
        adapter=directory(f"{R}/validate/{{arm}}/adapter"),
    params:
        config=CONFIG,
        settings=wl.per_run(config, wl.settings, "validate"),  # rerun when these settings change
        out_dir=lambda wildcards, output: str(Path(output.gates).parent),
    conda:
        "../../environment.yml"
    log:
        run=f"{R}/validate/{{arm}}/run.log",
        console=f"{R}/validate/{{arm}}/console.log",  # all the process printed (bench.smk says why)
    wildcard_constraints:
        arm="[a-z0-9_]+",
    resources:
        gpu=GPU,
        mem_mb=wl.per_run(config, wl.mem_mb, "bench"),
        runtime=VALIDATE_TIMEOUT_S // 60 + 30,  # minutes: the fine-tune's own limit plus load and reload
        **TIER_RES,
    shell:
        # every input checked against its recorded hash first: a truncated or edited file stops the job, named
        "python -m moebench.inputs verify --data {input.train} {input.heldout} --model {input.model} && "
        "python -m moebench.validate --config {params.config} --tier {input.tier} --model {input.model}"
        " --train {input.train} --heldout {input.heldout} --arm {wildcards.arm} --out-dir {params.out_dir}"
        " --log {log.run} 2>&1 | tee {log.console}"


VALIDATE_TARGETS = [f"results/{run}/validate/{arm}/metrics.csv" for run, cfg in RUNS.items() for arm in wl.validate_arms(cfg)]
