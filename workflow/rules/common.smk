# Shared helpers for the rules: the bench targets of a run and the report's inputs.
def draws(wildcards):
    """Bench draws of this run: known after detection (the tier plan says how many)."""
    run, cfg = wildcards.run, RUNS[wildcards.run]
    tier = checkpoints.detect.get(run=run).output.tier
    targets = wl.draw_targets(tier, f"results/{run}", cfg["arms"])
    # capacity sweeps (GPU time): longest sequence at batch 1, largest batch, for the arms config `sweeps` names
    targets += [f"results/{run}/sweep/{arm}/{kind}.csv" for arm, kind in wl.sweeps(cfg)]
    targets += [f"results/{run}/validate/{arm}/metrics.csv" for arm in wl.validate_arms(cfg)]  # training validation
    targets += [f"results/{run}/shapes/{arm}.csv" for arm in (cfg.get("shape_curve") or {}).get("arms") or []]
    ab = (cfg.get("routing_ab") or {}).get("arms") or []  # raw vs calibrated routers, in one process per arm
    targets += [f"results/{run}/routing_ab/{arm}/metrics.csv" for arm in ab]
    targets += wl.point_targets(cfg, f"results/{run}")  # settings the recipe asked to measure (recipe.points)
    for spec in cfg["offload"]["runs"]:  # arm:mode
        arm, mode = spec.split(":")
        targets.append(f"results/{run}/offload/{arm}/{mode}/metrics.csv")
    return targets


# The report: figures, tables and captions for every run in results/ (this invocation's runs plus committed GPU
# runs, whose files are static), so `snakemake --report report.html` builds on a machine without a GPU.
# REPORT_TARGETS go into the default target. Each figure has sidecars, <name>.json (numbers + provenance ids) and
# <name>.caption.rst (the same as an rst table), which the caption in workflow/report/ includes.
import glob as _glob
import os as _os
import re as _re

# This invocation's runs and those found at parse time; `_report` holds the cross-run views and is no run.
REPORT_RUNS = sorted((set(RUNS) | {_os.path.basename(_os.path.dirname(p))
                                  for p in _glob.glob("results/*/metrics.csv")}) - {"_report"})
_RUN_RE = "|".join(_re.escape(r) for r in REPORT_RUNS)
_REPORT_RULES = {"report_plots", "report_runs", "report_provenance"}
# Captions of report() items made inside input functions must be resolved here (Snakemake only resolves
# those written in the rule body).
_PROV_JSON_CAPTION = workflow.current_basedir.join("../report/provenance_json.rst")


def _present_or_made(path):
    """A committed run's file counts when it is on disk; this run's also when some rule makes it."""
    return _os.path.exists(path) or any(
        r.is_producer(path) for r in workflow.rules if r.name not in _REPORT_RULES)


def _run_files(run, names):
    return [f"results/{run}/{n}" for n in names if _present_or_made(f"results/{run}/{n}")]


def _plots_input(wildcards):
    return _run_files(wildcards.run, ["metrics.csv", "tier.json", "verdict.json"])


def _provenance_input(wildcards):
    """provenance.json is itself a report item (a download); the others are read into the rendered page."""
    r = wildcards.run
    made = _run_files(r, ["provenance.json"])
    return {"json": [report(p, category="Provenance", subcategory=r, caption=_PROV_JSON_CAPTION,
                            labels={"run": r, "item": "provenance.json"}) for p in made],
            "others": _run_files(r, ["PROVENANCE.md", "provenance_stamp.json", "provenance.json.ots"])}


def _plot(run_cat, name, caption, label):
    return report(f"results/{{run}}/plots/{name}", category=run_cat, subcategory="{run}",
                  caption=f"../report/{caption}.rst", labels={"run": "{run}", "figure": label})


# Input and report() helpers for quant.smk, recipe.smk and claims.smk, kept here so those hold rules only (--lint).
# Unsloth's 4-bit GPT-OSS class reads a per-expert bnb-4bit layout: made once per model build, and checked
# against the bf16 model (routers, biases, expert and MoE outputs; a scrambled-expert control must fail) before
# unsloth_4bit is timed on it.
def bnb4_check(wildcards):
    cfg = RUNS[wildcards.run]
    if wildcards.arm != "unsloth_4bit" or cfg["model"]["name"] != "gpt-oss-20b" or wl.gpu_jobs(cfg) == 0:
        return []
    return [f"results/{wildcards.run}/model-unsloth-bnb4.check.json"]


# unsloth_fp8 loads a prebuilt FP8 (torchao) checkpoint, made once per model build with Unsloth's own config
# (Unsloth's on-the-fly cache is named by the directory's basename, so every run's model/ would share one).
# Where FP8 cannot run (no GPU, torchao missing or old, not Hopper) the folder holds only the record saying why,
# and the arm's rows are `skipped` with that reason.
def fp8_checkpoint(wildcards):
    if wildcards.arm != "unsloth_fp8" or wl.gpu_jobs(RUNS[wildcards.run]) == 0:
        return []
    return [f"results/{wildcards.run}/model-fp8"]


# Runs under results/ that this invocation does not make (committed ones): the report re-derives their claims
# ledger and recipe pages into results/<run>/report/, never rewriting the run's own files.
COMMITTED_RUNS = sorted(set(REPORT_RUNS) - set(RUNS))
COMMITTED_RE = "|".join(_re.escape(r) for r in COMMITTED_RUNS) or "(?!)"  # (?!) matches nothing


def _recipe_page():
    return report("results/{run}/report/recipe.html", category="Recipe", subcategory="{run}",
                  caption="../report/recipe.rst", labels={"run": "{run}", "item": "recipe"})


def _claims_page():
    return report("results/{run}/report/claims.html", category="Claims", subcategory="{run}",
                  caption="../report/claims.rst", labels={"run": "{run}", "item": "claims ledger"})
