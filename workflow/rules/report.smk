# The report: figures, tables and captions for every run in results/ (this run plus committed GPU runs, whose
# files are static), so `snakemake --report report.html` builds on a machine without a GPU.
# Add REPORT_TARGETS to `rule all`. Each figure has sidecars: <name>.json (numbers + provenance ids) and
# <name>.caption.rst (the same as an rst table), which the caption in workflow/report/ includes.
import glob as _glob
import os as _os
import re as _re

_REPORT_RUN = config.get("run", "local")
# Runs found at parse time; `_report` holds the cross-run views and is no run.
REPORT_RUNS = sorted(({_REPORT_RUN} | {_os.path.basename(_os.path.dirname(p))
                                      for p in _glob.glob("results/*/metrics.csv")}) - {"_report"})
_RUN_RE = "|".join(_re.escape(r) for r in REPORT_RUNS)
_REPORT_RULES = {"report_plots", "report_runs", "report_provenance"}
_PY_PLOTS = "python -m moebench.plots"
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


rule report_plots:
    input:
        _plots_input,
    output:
        throughput=_plot("Throughput", "throughput.png", "throughput", "tokens/s per arm"),
        speedup=_plot("Throughput", "speedup.png", "speedup", "speedup vs baselines"),
        memory=_plot("Memory", "memory.png", "memory", "peak memory vs card"),
        frontier=_plot("Offload", "frontier.png", "frontier", "memory/speed frontier"),
        energy=_plot("Energy", "energy.png", "energy", "J/token"),
        loss=_plot("Training", "loss.png", "loss", "loss curves"),
        gates=_plot("Training", "gates.html", "gates", "gate table and verdict"),
        metrics=_plot("Provenance", "metrics.html", "metrics", "every metrics.csv row"),
        sidecars=expand("results/{{run}}/plots/{name}.{ext}", ext=["json", "caption.rst"],
                        name=["throughput", "speedup", "memory", "frontier", "energy", "loss", "gates", "metrics"]),
    params:
        baselines=" ".join(config.get("baselines", ["hf_bf16", "unsloth_4bit"])),
    wildcard_constraints:
        run=_RUN_RE,
    log:
        "results/{run}/logs/report_plots.log",
    shell:
        "{_PY_PLOTS} run --run-dir results/{wildcards.run} --out results/{wildcards.run}/plots"
        " --baselines {params.baselines} > {log} 2>&1"


rule report_runs:
    input:
        lambda wildcards: [f for r in REPORT_RUNS for f in _run_files(r, ["metrics.csv", "tier.json", "verdict.json"])],
    output:
        tiers=report("results/_report/tiers.png", category="Throughput", subcategory="all runs (tier comparison)",
                     caption="../report/tiers.rst", labels={"run": "all", "figure": "tier comparison"}),
        sidecars=["results/_report/tiers.json", "results/_report/tiers.caption.rst"],
        summary="results/_report/summary.rst",  # the verdicts workflow.rst includes
    params:
        runs=" ".join(f"results/{r}" for r in REPORT_RUNS),
    log:
        "results/_report/report_runs.log",
    shell:
        "{_PY_PLOTS} runs --run-dirs {params.runs} --out results/_report > {log} 2>&1"


# Provenance files are written by the provenance/stamp rules (this run) or committed (GPU runs); this rule
# only renders their status and the `ots verify` recipe into a page of the report.
rule report_provenance:
    input:
        unpack(_provenance_input),
    output:
        page=report("results/{run}/report/provenance.html", category="Provenance", subcategory="{run}",
                    caption="../report/provenance.rst", labels={"run": "{run}", "item": "stamp status"}),
        sidecars=["results/{run}/report/provenance.caption.rst", "results/{run}/report/provenance_status.json"],
    wildcard_constraints:
        run=_RUN_RE,
    log:
        "results/{run}/logs/report_provenance.log",
    shell:
        "{_PY_PLOTS} provenance --run-dir results/{wildcards.run} --out results/{wildcards.run}/report > {log} 2>&1"


REPORT_TARGETS = (
    expand("results/{run}/plots/throughput.png", run=REPORT_RUNS)
    + expand("results/{run}/report/provenance.html", run=REPORT_RUNS)
    + ["results/_report/tiers.png"]
)
