# The recipe for this card (issue 23): the fastest setting that fits with headroom, the smallest that trains and
# the lowest net J/token, each a measured point of the run's grid (bench, offload, sweep rows in metrics.csv),
# with a ready-to-paste training snippet. Reads tables only: runs on the submitting host.
_RECIPE_CMD = ("python -m moebench.recipe --config {params.config} --tier {input.tier} --metrics {input.metrics}"
               " --out {output.json} --markdown {output.md} --out-html {output.page} --log {log}")


localrules:
    recipe,
    recipe_committed,


rule recipe:
    input:
        run_config=ancient(RUN_CONFIG),  # made by rule run_config; its rewrite alone reruns nothing
        metrics=f"{R}/metrics.csv",
        tier=f"{R}/tier.json",
    output:
        json=f"{R}/recipe.json",
        md=f"{R}/recipe.md",
        page=_recipe_page(),
    params:
        config=CONFIG,
        settings=wl.per_run(config, wl.settings, "recipe"),  # rerun when these settings change
    conda:
        "../../environment.yml"
    log:
        f"{R}/logs/recipe.log",
    shell:
        _RECIPE_CMD


# A committed run's recipe page, from its committed metrics and resolved config (its recipe.json, where it has
# one, stays as committed).
rule recipe_committed:
    input:
        metrics="results/{run}/metrics.csv",
        tier="results/{run}/tier.json",
    output:
        json="results/{run}/report/recipe.json",
        md="results/{run}/report/recipe.md",
        page=_recipe_page(),
    params:
        config="results/{run}/config.yaml",
    wildcard_constraints:
        run=COMMITTED_RE,
    conda:
        "../../environment.yml"
    log:
        "results/{run}/report/recipe.log",
    shell:
        _RECIPE_CMD


RECIPE_TARGETS = expand("results/{run}/recipe.json", run=RUNS) + expand("results/{run}/report/recipe.json",
                                                                      run=COMMITTED_RUNS)


rule model_fp8:
    input:
        model=f"{R}/model",
    output:
        directory(f"{R}/model-fp8"),
    conda:
        "../../environment.yml"
    log:
        f"{R}/logs/model_fp8.log",
    resources:
        gpu=GPU,
        mem_mb=wl.per_run(config, wl.mem_mb, "model"),
        runtime=30,
        **TIER_RES,
    shell:
        "python -m moebench.arms.unsloth_fp8 make-fp8 {input.model} {output} > {log} 2>&1"
