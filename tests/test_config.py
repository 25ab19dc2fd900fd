import copy

import pytest
import yaml

from conftest import ROOT, copy_repo, snakemake
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
    from moebench.arms.unsloth import run_env

    c = copy.deepcopy(BASE)
    c["plan_overrides"] = {"unsloth_env": {"UNSLOTH_BLOCK_MOE": "outside"}}
    assert run_env(cfgmod.validate(c)["plan_overrides"]) == {"UNSLOTH_BLOCK_MOE": "outside"}
    assert "HF_TOKEN" in bad(plan_overrides={"unsloth_env": {"HF_TOKEN": "x"}})
    assert "'plan_overrides.unsloth_env.UNSLOTH_BLOCK_COMPILE'" in bad(
        plan_overrides={"unsloth_env": {"UNSLOTH_BLOCK_COMPILE": 0}})


def test_workflow_stops_before_any_job_on_bad_config(tmp_path):
    root = copy_repo(tmp_path)
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
