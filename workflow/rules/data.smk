rule data:
    input:
        run_config=ancient(RUN_CONFIG),  # made by rule run_config; its rewrite alone reruns nothing
        model=f"{R}/model",
    output:
        train=f"{R}/data/train.jsonl",
        heldout=f"{R}/data/heldout.jsonl",
        sha=f"{R}/data/data.sha256",
    conda:
        "../../environment.yml"
    log:
        f"{R}/logs/data.log",
    params:
        config=CONFIG,
        settings=wl.per_run(config, wl.settings, "data"),  # rerun when these settings change
        outdir=lambda wildcards, output: str(Path(output.sha).parent),
    resources:
        runtime=10,
    shell:
        # every input checked against its recorded hash first: a truncated or edited file stops the job, named
        "python -m moebench.inputs verify --model {input.model} && "
        "python -m moebench.data --config {params.config} --model {input.model} --out {params.outdir} --sha {output.sha}"
        " --log {log}"
