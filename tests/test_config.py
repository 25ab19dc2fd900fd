import copy

import pytest
import yaml

from conftest import BACKGROUND_NICE, ROOT, background, copy_repo, snakemake
from moebench import config as cfgmod

BASE = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())


def bad(**change):
    c = copy.deepcopy(BASE)
    for dotted, value in change.items():
        *path, key = dotted.split("__")
        node = c
        for p in path:
            node = node[p]
        node[key] = value
    with pytest.raises(cfgmod.ConfigError) as e:
        cfgmod.validate(c)
    return str(e.value)


def test_default_config_is_valid_and_gets_defaults():
    c = cfgmod.validate(copy.deepcopy(BASE))
    assert c["lora"]["r"] == 64 and c["verdict"]["min_speedup"] == 1.5


def test_bad_enum_names_key_value_and_allowed():
    msg = bad(tier="h900")
    assert "'tier'" in msg and "'h900'" in msg and "'h100_80gb'" in msg


def test_bad_number_names_bounds():
    msg = bad(lora__r=0)
    assert "'lora.r'" in msg and "got 0" in msg and ">= 1" in msg


def test_unknown_arm_and_unknown_key():
    assert "'arms.0'" in bad(arms=["tpu_magic"])
    assert "bogus" in bad(bogus=1)


def test_unsloth_env_takes_unsloth_switches_only():
    """A run may set Unsloth's own switches (e.g. keeping experts out of its compile region), nothing else."""
    from moebench.arms.unsloth_runtime import run_env

    c = copy.deepcopy(BASE)
    c["plan_overrides"] = {"unsloth_env": {"UNSLOTH_BLOCK_MOE": "outside"}}
    assert run_env(cfgmod.validate(c)["plan_overrides"]) == {"UNSLOTH_BLOCK_MOE": "outside"}
    assert "HF_TOKEN" in bad(plan_overrides={"unsloth_env": {"HF_TOKEN": "x"}})
    assert "'plan_overrides.unsloth_env.UNSLOTH_BLOCK_COMPILE'" in bad(
        plan_overrides={"unsloth_env": {"UNSLOTH_BLOCK_COMPILE": 0}})


def test_workflow_stops_before_any_job_on_bad_config(tmp_path):
    root = copy_repo(tmp_path, committed=())  # it stops at parsing: the committed runs play no part
    r = snakemake(root, "-n", "--config", "tier=h900")
    assert r.returncode != 0
    assert "config key 'tier': got 'h900'" in r.stdout + r.stderr
    assert not (root / "results" / "local" / "tier.json").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "config" / "runs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_run_config_is_valid_before_it_costs_gpu_time(path):
    """Each config/runs/*.yaml, layered on config.yaml as `--configfile` does, passes the schema and names a model
    and scale that models.yaml has: a typo shows here, not on a lent GPU."""
    from snakemake.utils import update_config

    c = copy.deepcopy(BASE)
    update_config(c, yaml.safe_load(path.read_text()))
    c = cfgmod.validate(c)
    assert c["run"] == path.stem
    spec = cfgmod.load_yaml("models.yaml")[c["model"]["name"]]
    assert c.get("plan_overrides", {}).get("model_scale", "full") in spec


def test_config_strings_are_coerced_to_the_schema_types():
    """`snakemake --config` hands nested values (and top-level 'false') over as strings: 'false' must not count as
    true, '3' must be a number, 'null' must be null; a string the schema wants stays a string."""
    c = copy.deepcopy(BASE)
    c.update(sweeps="false", lora={**c["lora"], "r": "3"}, validate={"seq_len": "null", "lr": "2e-4"},
             provenance={**c["provenance"], "require_stamp": "false", "min_calendars": "1", "timeout_s": "2.5"},
             offload={**c["offload"], "caps_gb": ["24", "40"]})
    c = cfgmod.validate(c)
    assert c["sweeps"] is False and c["lora"]["r"] == 3 and c["validate"]["seq_len"] is None
    assert c["provenance"]["require_stamp"] is False and c["provenance"]["min_calendars"] == 1
    assert c["provenance"]["timeout_s"] == 2.5 and c["validate"]["lr"] == 2e-4 and c["offload"]["caps_gb"] == [24, 40]
    assert "'provenance.require_stamp'" in bad(provenance={"require_stamp": "maybe"})
    assert "'provenance.calendars.0'" in bad(provenance={"calendars": ["ftp://x"]})


def _git(root, *args):
    import subprocess

    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout


@background("overridden")
def overridden(tmp_path_factory):
    """A fresh clone (every committed run) made a git repo, then dry runs that override settings, one naming a
    committed run, each followed by `git status`: run beside the other tests. Returns (root, the committed
    runs' config.yaml, [(args, Ran, status)])."""
    root = copy_repo(tmp_path_factory.mktemp("overridden"))
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "clone")
    committed = sorted(p.relative_to(root) for p in (root / "results").glob("*/config.yaml"))
    ran = []
    for args in (["--config", "provenance={require_stamp: false, timeout_s: 1}"],
                 ["--config", f"run={committed[0].parts[1]}", "sweeps=false"] if committed else []):
        r = snakemake(root, "-n", *args, nice=BACKGROUND_NICE)
        ran.append((args, r, _git(root, "status", "--porcelain")))
    return root, committed, ran


def test_dry_run_with_config_override_writes_nothing(overridden):
    """Parsing the workflow (a dry run, even one naming a committed run and overriding its settings) leaves a fresh
    clone's tree exactly as it was: each run's config.yaml is written by a job, never at parse time."""
    root, committed, ran = overridden
    assert committed, "no committed run to check against"
    for args, r, status in ran:
        assert r.returncode == 0, r.stderr[-2000:]
        assert status == "", args
    assert not (root / "results" / "local").exists()
