"""Measure the verdict pair interleaved: draw 1 of each arm, then draw 2 of each, … (A B A B …), each draw its own
Snakemake job and so its own fresh process, on one machine in one sitting, so that drift (clocks, heat, other
tenants) hits both arms alike. Snakemake alone would run all draws of one arm, then the other's.

    python -m moebench.interleave --configfile config/runs/h200-gptoss20b-tier.yaml -- --cores 8 --resources gpu=1

Runs, in order: the inputs every draw needs (tier, data, model, and the checked 4-bit checkpoint where an arm
needs one), the interleaved draws, the verdict arms' validations, then the rest of the workflow (other arms,
aggregate, provenance). Resumable: a draw already on disk is kept unless --force re-measures it, also on a fresh
machine that rebuilds the model: when the rebuilt model and data hash as the ones on disk were measured on
(weights' fingerprint, config, tokenizer, data), every measurement of the run on disk (draws of every arm,
validations, shape curve, offload, sweeps, routing A/B) is marked current (`snakemake --touch`); otherwise
Snakemake re-measures them, since they no longer describe this build.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

VERDICT_ARMS = ("unsloth_bf16", "unsloth_4bit")
RUN_OUTPUTS = ["results/{run}/comparison.md", "results/{run}/verdict.json", "results/{run}/PROVENANCE.md",
               "results/{run}/provenance_stamp.json"]


def order(arms: list[str], draws: int) -> list[tuple[str, int]]:
    """(arm, draw) in the order they run: every arm's draw k before any arm's draw k+1."""
    return [(arm, k) for k in range(1, draws + 1) for arm in arms]


def draw_target(run: str, arm: str, k: int) -> str:
    return f"results/{run}/arms/{arm}/draw{k}/metrics.csv"


def prerequisites(run: str, arms: list[str], model: str, gpu: bool) -> list[str]:
    out = [f"results/{run}/tier.json", f"results/{run}/data/data.sha256", f"results/{run}/model.sha256"]
    if gpu and model == "gpt-oss-20b" and "unsloth_4bit" in arms:
        out.append(f"results/{run}/model-unsloth-bnb4.check.json")
    return out


def validations(cfg: dict, arms: list[str], run: str) -> list[str]:
    """Validation targets of the interleaved arms that the run validates."""
    wanted = (cfg.get("validate") or {}).get("arms") or []
    return [f"results/{run}/validate/{arm}/metrics.csv" for arm in arms if arm in wanted]


def input_hashes(run: str) -> dict[str, str]:
    """What identifies the build the draws read: the model's weight fingerprint (sizes, headers, samples), its
    config and tokenizer hashes, and the data's hashes; not the build's timings, which differ every time."""
    r = Path(f"results/{run}")
    rec = json.loads((r / "model.sha256").read_text()) if (r / "model.sha256").is_file() else {}
    ident = {k: rec.get(k) for k in ("config_sha256", "tokenizer_sha256", "files", "weights_sha256")}
    out = {"model.sha256": json.dumps(ident, sort_keys=True)}
    for name in ("model.fingerprint.json", "data/data.sha256"):
        p = r / name
        out[name] = p.read_text() if p.is_file() else ""
    return {k: hashlib.sha256(v.encode()).hexdigest() for k, v in out.items()}


# What a GPU sitting measured, per run (each a rule's output that Snakemake can be asked for by name): all of it
# depends on the model build, which a fresh machine rebuilds.
MEASURED = ("arms/*/draw*/metrics.csv", "validate/*/metrics.csv", "shapes/*.csv", "offload/*/*/metrics.csv",
            "sweep/*/seq.csv", "sweep/*/batch.csv", "routing_ab/*/metrics.csv")  # not the ladders' own csv


def kept_outputs(run: str, before: dict, after: dict, log) -> list[str]:
    """Measurements on disk that stay: their inputs were rebuilt identical (a fresh machine rebuilds the model,
    which makes every measurement look outdated to Snakemake's file times). A changed build keeps none."""
    done = sorted(str(p) for pat in MEASURED for p in Path(f"results/{run}").glob(pat))
    if done and before != after:
        changed = [k for k in before if before[k] != after[k]]
        log(f"the rebuilt {', '.join(changed)} differ from the ones the {len(done)} measurement(s) on disk were "
            "made on: they are measured again")
        return []
    return done


def snakemake(args: list[str], targets: list[str], log) -> int:
    cmd = [sys.executable, "-m", "snakemake", *targets, *args]  # targets first: --configfile takes several values
    log(f"$ {' '.join(cmd)}")
    return subprocess.call(cmd)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configfile", required=True, help="the run's config (config/runs/<run>.yaml)")
    ap.add_argument("--arms", nargs="+", default=list(VERDICT_ARMS), help="arms to interleave (default: the verdict pair)")
    ap.add_argument("--draws", type=int, default=None, help="draws of each (default: the tier plan's verdict_draws)")
    ap.add_argument("--force", action="store_true", help="re-measure draws already on disk")
    ap.add_argument("--rest", choices=["all", "run", "none"], default="all",
                    help="after the draws: the whole workflow (all), this run's own outputs only (run: the other "
                         "arms, aggregate, provenance and stamp, no report; what a lent GPU's time is for), or none")
    ap.add_argument("snakemake_args", nargs=argparse.REMAINDER, help="after --: passed to every snakemake call")
    a = ap.parse_args(argv)
    extra = [x for x in a.snakemake_args if x != "--"]
    cfg = yaml.safe_load(Path(a.configfile).read_text())
    run = cfg["run"]
    base = ["--configfile", a.configfile, *extra]
    log = lambda m: print(f"[interleave {time.strftime('%H:%M:%S')}] {m}", flush=True)
    model = (cfg.get("model") or {}).get("name", "gpt-oss-20b")
    tier_json = Path(f"results/{run}/tier.json")
    if snakemake(base, [str(tier_json)], log):
        sys.exit(f"interleave: detecting the tier of {run} failed (see above)")
    tier = json.loads(tier_json.read_text())
    gpu = tier.get("gpu") is not None
    need = prerequisites(run, a.arms, model, gpu)
    before = input_hashes(run)
    if snakemake(base, need[:3], log):
        sys.exit(f"interleave: building the inputs of {run} failed (see above)")
    if need[3:] and snakemake(base, need[3:], log):  # the 4-bit checkpoint failed its check (or its build)
        log(f"{need[3]} was not made: unsloth_4bit cannot be timed (see its log); the other draws go on")
    plan = tier["plan"]
    n = a.draws or plan.get("verdict_draws") or plan["draws"]
    seq = order(a.arms, n)
    # --force re-measures the interleaved draws only: what else is on disk stays when the build is the same
    forced = {draw_target(run, arm, k) for arm, k in seq} if a.force else set()
    keep = [t for t in kept_outputs(run, before, input_hashes(run), log) if t not in forced]
    if keep:
        log(f"{len(keep)} measurement(s) on disk were made on this same build: kept (snakemake --touch)")
        snakemake(base + ["--touch"], keep, log)
    failed = []
    for i, (arm, k) in enumerate(seq, 1):
        target = draw_target(run, arm, k)
        log(f"[{i}/{len(seq)}] {arm} draw {k}")
        if snakemake(base + (["--force"] if a.force else []), [target], log):
            failed.append(target)  # a failed draw is a result too: its rows say why; go on with the others
    if failed:
        log(f"{len(failed)} draw(s) ended with an error: {failed}")
    if a.rest != "none":
        checks = validations(cfg, a.arms, run)
        if checks:  # the verdict rests on them: before the other arms and the shape curve
            log(f"the verdict arms' validations: {checks}")
            snakemake(base, checks, log)
        log(f"the rest of the workflow ({a.rest})")
        sys.exit(snakemake(base, [t.format(run=run) for t in RUN_OUTPUTS] if a.rest == "run" else [], log))


if __name__ == "__main__":
    main()
