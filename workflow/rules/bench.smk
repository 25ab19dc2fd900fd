rule bench:
    input:
        tier=f"{R}/tier.json",
        model=f"{R}/model",
        train=f"{R}/data/train.jsonl",
    output:
        metrics=f"{R}/arms/{{arm}}/draw{{draw}}/metrics.csv",
        env=f"{R}/arms/{{arm}}/draw{{draw}}/env.json",
    params:
        config=CONFIG,
        settings=wl.per_run(config, wl.settings, "bench"),  # rerun when these settings change
    conda:
        "../../environment.yml"
    log:
        f"{R}/arms/{{arm}}/draw{{draw}}/run.log",
    wildcard_constraints:
        arm="[a-z0-9_]+",
        draw=r"\d+",
    resources:
        gpu=GPU,
        mem_mb=wl.per_run(config, wl.mem_mb, "bench"),
        runtime=30,
        **TIER_RES,
    shell:
        "python -m moebench.bench --config {params.config} --tier {input.tier} --model {input.model} --data {input.train}"
        " --arm {wildcards.arm} --draw {wildcards.draw} --out {output.metrics} --log {log}"
