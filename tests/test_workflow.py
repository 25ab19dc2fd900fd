"""The whole chain on CPU from a copy of the repo, as a new user would run it; the fan-out over tiers (dry run)."""
import json
import re
import shutil
import time

import pytest
import yaml

from conftest import (BACKGROUND_NICE, QUICK, ROOT, background, clone, copy_repo, kill_group, snakemake,
                      wait_cpu_run)
from moebench import config as cfgmod
from moebench import workflowlib as wl
from moebench.metrics import read_rows


def test_cpu_chain_leaves_every_output(cpu_run):
    r = cpu_run / "results" / "local"
    for f in ("tier.json", "data/train.jsonl", "data/heldout.jsonl", "data/data.sha256", "model.sha256",
              "metrics.csv", "comparison.csv", "comparison.md", "verdict.json"):
        assert (r / f).is_file(), f
    rows = read_rows(r / "metrics.csv")
    hf = [x for x in rows if x.arm == "hf_bf16" and x.metric == "step_s"]
    assert len(hf) == 2 and all(x.status == "measured" and x.value > 0 for x in hf)
    skipped = {x.arm for x in rows if x.status == "skipped"}
    assert {"hf_bnb4", "unsloth_bf16", "unsloth_4bit", "e4b_4bit"} <= skipped
    assert "| hf_bf16 | measured | 2 |" in (r / "comparison.md").read_text()
    # each draw keeps all its process printed (third-party output too) beside its run.log
    console = (r / "arms/hf_bf16/draw1/console.log").read_text()
    assert "MOEBENCH_ROW" in console and "step_s" in console
    # one local invocation is one session: no cross-session note
    assert len(json.loads((r / "verdict.json").read_text())["sessions"]) == 1


def test_second_invocation_does_nothing(cpu_run):
    r = snakemake(cpu_run, "--cores", "2", *QUICK, "-n")
    assert r.returncode == 0
    assert "Nothing to be done" in r.stdout + r.stderr, r.stdout[-2000:]


def test_a_clone_of_the_run_is_done_too(cpu_run, tmp_path):
    """conftest.clone: what tests that add to the shared run build on (they must not write into it)."""
    r = snakemake(clone(cpu_run, tmp_path / "clone"), "--cores", "2", *QUICK, "-n")
    assert r.returncode == 0 and "Nothing to be done" in r.out, r.out[-2000:]


def test_lint_is_clean(cpu_run):
    r = snakemake(cpu_run, "--lint")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Congratulations" in r.stdout + r.stderr or "no issues" in (r.stdout + r.stderr).lower()


@background("killed_run")
def killed_run(tmp_path_factory):
    """A clone of the CPU run without hf_bf16's first draw and the aggregate table: Snakemake rebuilds just those,
    is killed inside that draw, and resumes after --unlock. Run in the background once the CPU run is done; returns
    what the test checks: whether Snakemake was still running when killed (with its log), the files after the
    kill, the --unlock and the resumed run."""
    root = clone(wait_cpu_run(), tmp_path_factory.mktemp("killed") / "clone")
    local = root / "results" / "local"
    draw = local / "arms" / "hf_bf16"
    shutil.rmtree(draw / "draw1")
    (local / "metrics.csv").unlink()
    # up to the aggregate table: what resuming has to prove (the report stages are covered elsewhere)
    target = "results/local/metrics.csv"
    p = snakemake(root, "--cores", "1", target, *QUICK, wait=False, nice=BACKGROUND_NICE)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not (draw / "draw1" / "run.log").exists():
        time.sleep(0.1)
    time.sleep(1.0)  # inside the draw: its log opens before the ~10 s of imports and loading
    seen = {"running": p.poll() is None, "log": (root / "snakemake.out").read_text()[-3000:]}
    kill_group(p)
    seen.update(metrics=(local / "metrics.csv").exists(), draw_metrics=(draw / "draw1" / "metrics.csv").exists())
    # after a hard kill (power loss) Snakemake's lock stays: --unlock as its message says, then run again
    seen["unlock"] = snakemake(root, "--unlock", nice=BACKGROUND_NICE)
    seen["resumed"] = snakemake(root, "--cores", "2", target, *QUICK, nice=BACKGROUND_NICE)
    return root, seen


def test_killed_run_resumes_without_taking_partial_output(killed_run):
    root, seen = killed_run
    assert seen["running"], seen["log"]
    assert not seen["metrics"]
    assert not seen["draw_metrics"]  # the killed draw left no output that looks done
    assert seen["unlock"].returncode == 0, seen["unlock"].out[-2000:]
    r = seen["resumed"]
    assert r.returncode == 0, r.out[-4000:]
    assert "bench" in r.out and "\ndetect" not in r.out  # only what was taken away was rebuilt
    rows = read_rows(root / "results" / "local" / "metrics.csv")
    assert sum(x.metric == "step_s" and x.arm == "hf_bf16" and x.status == "measured" for x in rows) == 2


# ---- several tiers in one invocation (config cluster.tiers) -------------------------------------------------
CLUSTER = "cluster={tiers: {cpu: {partition: [cpu, cpu2]}, h100_80gb: {partition: h100}}}"
FANNED = {"local-cpu-cpu": "cpu", "local-cpu-cpu2": "cpu2", "local-h100_80gb": "h100"}  # run -> partition


def _config(**change) -> dict:
    c = cfgmod.validate(yaml.safe_load((ROOT / "config" / "config.yaml").read_text()))
    c.update(change)
    return c


def test_runs_without_cluster_tiers_is_the_configured_run():
    c = _config()
    assert wl.runs(c) == {"local": c} and wl.runs(c)["local"] is c  # untouched: same effective config as before
    assert wl.cluster_resources(c) == {}
    assert wl.per_run(c, wl.settings, "bench") == wl.settings(c, "bench")  # plain values, no wildcard lookups


def test_runs_fan_out_one_per_tier_and_partition():
    c = _config(cluster={"tiers": {"a100_40gb": {"partition": "a100", "gpu_model": "a100"},
                                   "cpu": {"partition": ["cpu", "cpu2"], "gpu_model": "none"}}})
    runs = wl.runs(c)
    assert {n: (r["tier"], r["cluster"]["tiers"]) for n, r in runs.items()} == {
        "local-a100_40gb": ("a100_40gb", {"a100_40gb": {"partition": "a100", "gpu_model": "a100"}}),
        "local-cpu-cpu": ("cpu", {"cpu": {"partition": "cpu", "gpu_model": "none"}}),
        "local-cpu-cpu2": ("cpu", {"cpu": {"partition": "cpu2", "gpu_model": "none"}})}
    for run in runs.values():  # each run's config is valid on its own (detect and the stages load it)
        cfgmod.validate(run)
    assert c["run"] == "local" and c["tier"] == "auto"  # the user's config is not changed
    res = wl.cluster_resources(c)
    assert set(res) == {"slurm_partition", "gpu_model"}  # no account/constraint: the profile's defaults stay
    cpu2, a100 = (type("Wildcards", (), {"run": r}) for r in ("local-cpu-cpu2", "local-a100_40gb"))
    assert res["slurm_partition"](cpu2) == "cpu2" and res["gpu_model"](cpu2) == "none"
    assert res["slurm_partition"](a100) == "a100" and res["gpu_model"](a100) == "a100"
    assert wl.per_run(c, wl.gpu_jobs)(cpu2) == 0 and wl.per_run(c, wl.gpu_jobs)(a100) == 1


@pytest.mark.parametrize("tiers,message", [
    ({"h900": {"partition": "x"}}, "config key 'cluster.tiers.h900': 'h900' is not a tier of config/tiers.yaml"),
    ({"a100_40gb": {"partition": "a", "account": "p"}, "h100_80gb": {"partition": "h"}},
     "config key 'cluster.tiers.h100_80gb.account': missing, but tier(s) a100_40gb set 'account'"),
])
def test_cluster_tiers_errors_name_the_key(tiers, message):
    with pytest.raises(cfgmod.ConfigError) as e:
        wl.runs(_config(cluster={"tiers": tiers}))
    assert message in str(e.value)


def test_cluster_tiers_schema_names_the_key():
    c = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    c["cluster"] = {"tiers": {"cpu": {"partion": "cpu"}}}
    with pytest.raises(cfgmod.ConfigError) as e:
        cfgmod.validate(c)
    assert "'cluster.tiers.cpu'" in str(e.value) and "'partion' was unexpected" in str(e.value)


def test_unknown_cluster_tier_stops_the_workflow_before_any_job(tmp_path):
    root = copy_repo(tmp_path, committed=())  # it stops at parsing: the committed runs play no part
    r = snakemake(root, "-n", "--config", "cluster={tiers: {h900: {partition: gpu}}}")
    assert r.returncode != 0
    assert "config key 'cluster.tiers.h900'" in r.stdout + r.stderr and "h100_80gb" in r.stdout + r.stderr
    assert not (root / "results" / "local").exists() and not list((root / "results").glob("local-*"))


def _jobs(out: str, rule: str) -> list[dict]:
    """The dry-run's listing of one rule's jobs: wildcards and resources as Snakemake prints them."""
    jobs = []
    for block in re.split(r"\n(?=\[|rule |checkpoint )", out):
        if re.match(rf"(rule|checkpoint) {rule}:", block.strip()):
            jobs.append({key: dict(kv.split("=", 1) for kv in m.split(", ")) for key, m in
                         re.findall(r"^\s+(wildcards|resources): (.*)$", block, re.M)})
    return jobs


def _plans() -> dict:
    """Each fanned-out run's tier plan, as detect would write it on the tier's own node."""
    tiers = cfgmod.load_yaml("tiers.yaml")
    return {run: tiers["cpu" if run.startswith("local-cpu") else "h100_80gb"]["plan"] for run in FANNED}


@background("fanned")
def fanned(tmp_path_factory):
    """The dry-run fan-out's Snakemakes, run beside the other tests: a dry run; each run's config.yaml as rule
    run_config writes it (local and quick); its tier.json as detect would write it; a dry run again. Stops at the
    first that fails. Returns (root, [their Ran])."""
    root = copy_repo(tmp_path_factory.mktemp("fanned"), committed=())  # the fan-out's jobs only: see copy_repo
    bg = {"nice": BACKGROUND_NICE}
    ran = [snakemake(root, "-n", "--config", CLUSTER, **bg)]
    if ran[-1].returncode == 0:
        configs = (f"results/{run}/config.yaml" for run in FANNED)
        ran.append(snakemake(root, "--cores", str(len(FANNED)), *configs, "--config", CLUSTER, **bg))
    if ran[-1].returncode == 0:
        for run, plan in _plans().items():  # what detect writes on the tier's own node (here: written for it)
            (root / "results" / run).mkdir(parents=True, exist_ok=True)
            tier = "cpu" if run.startswith("local-cpu") else "h100_80gb"
            (root / "results" / run / "tier.json").write_text(json.dumps({"tier": tier, "plan": plan}))
        ran.append(snakemake(root, "-n", "--config", CLUSTER, **bg))
    return root, ran


def test_dry_run_fans_the_matrix_out_over_the_tiers(fanned):
    """One detect per run on its partition; once each run's config.yaml and tier.json exist (as after run_config
    and detect), one bench job per run x arm x draw, each on its run's partition, and one aggregate per run."""
    root, ran = fanned
    r = ran[0]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    detects = _jobs(r.stdout, "detect")
    assert {j["wildcards"]["run"]: j["resources"]["slurm_partition"] for j in detects} == FANNED
    assert {j["resources"]["gpu"] for j in detects} == {"0", "1"}  # the CPU runs ask for no GPU, the H100 run for one
    r = ran[1]
    assert r.returncode == 0, r.out[-3000:]
    plans = _plans()
    r = ran[2]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    arms = _config()["arms"]
    bench = _jobs(r.stdout, "bench")
    got = sorted((j["wildcards"]["run"], j["wildcards"]["arm"], j["wildcards"]["draw"]) for j in bench)

    def n_draws(plan: dict, arm: str) -> int:  # the verdict pair gets the plan's verdict_draws when it has them
        return max(plan["draws"], plan.get("verdict_draws", 0)) if arm in wl.VERDICT_ARMS else plan["draws"]

    assert got == sorted((run, arm, str(d)) for run, plan in plans.items() for arm in arms
                         for d in range(1, n_draws(plan, arm) + 1))
    assert any(n_draws(plan, arm) == 3 for plan in plans.values() for arm in arms)  # the H100 pair: 3 draws
    assert all(j["resources"]["slurm_partition"] == FANNED[j["wildcards"]["run"]] for j in bench)
    # every job of every rule the cluster profile sends to a GPU node lands on its run's partition (the Slurm
    # fan-out in test_slurm runs detect, model and bench for real; validate, offload and sweep are checked here)
    profile = yaml.safe_load((ROOT / "slurm-gpu" / "config.yaml").read_text())["set-resources"]
    gpu_rules = {rule for rule, res in profile.items() if res.get("gpu") == 1}
    placed = {rule: [(j["wildcards"]["run"], j["resources"].get("slurm_partition")) for j in _jobs(r.stdout, rule)]
              for rule in gpu_rules}
    assert placed["validate"] and placed["model"], sorted(k for k, v in placed.items() if v)
    assert all(part == FANNED[run] for jobs in placed.values() for run, part in jobs), placed
    assert sorted(j["wildcards"]["run"] for j in _jobs(r.stdout, "aggregate")) == sorted(FANNED)
    assert not (root / "results" / "local").exists()  # no run named plain `local` when the tiers fan out


def test_jobs_get_the_interpreter_that_runs_snakemake(monkeypatch):
    """`.venv/bin/snakemake` without an activated venv: a job's `python` must still be the venv's (a recipe point
    run that way read "transformers not installed" from the system python)."""
    import os
    import sys

    from moebench import workflowlib as wl

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.setenv("PYTHONPATH", "")
    wl.put_package_on_pythonpath()
    assert os.environ["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
    assert "/usr/bin" in os.environ["PATH"].split(os.pathsep)
