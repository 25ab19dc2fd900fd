import json

import pytest
import yaml

from conftest import ROOT
from moebench import config as cfgmod
from moebench import detect
from moebench.detect import TierMismatch, host_inventory, make_plan, pick_tier

TIERS = cfgmod.load_yaml("tiers.yaml")


def gpu(name, mem):
    return [{"index": 0, "name": name, "memory_gb": mem, "compute_capability": "9.0"}]


@pytest.mark.parametrize("name,mem,tier", [
    ("NVIDIA H100 80GB HBM3", 79.1, "h100_80gb"),
    ("NVIDIA H200", 139.8, "h200_141gb"),
    ("NVIDIA A100-SXM4-40GB", 39.4, "a100_40gb"),
    ("NVIDIA A100-SXM4-80GB", 79.2, "a100_80gb"),
])
def test_known_cards(name, mem, tier):
    assert pick_tier(gpu(name, mem), TIERS) == (tier, [])


def test_cpu_host():
    assert pick_tier([], TIERS)[0] == "cpu"


def test_unknown_card_falls_back_by_memory_with_warning():
    tier, notes = pick_tier(gpu("NVIDIA GeForce RTX 5090", 31.4), TIERS)
    assert tier == "generic_large" and "unknown GPU" in notes[0]
    tier, _ = pick_tier(gpu("NVIDIA L4", 22.0), TIERS)
    assert tier == "generic_small"


def test_forced_tier_and_unknown_forced_tier():
    assert pick_tier(gpu("NVIDIA H100 80GB HBM3", 79.1), TIERS, "h100_80gb")[0] == "h100_80gb"
    assert pick_tier([], TIERS, "cpu") == ("cpu", ["tier forced by config: cpu"])  # the CPU tier on a CPU node
    assert pick_tier(gpu("NVIDIA GeForce RTX 5090", 31.4), TIERS, "generic_large")[0] == "generic_large"
    with pytest.raises(cfgmod.ConfigError, match="h900"):
        pick_tier([], TIERS, "h900")


@pytest.mark.parametrize("gpus,forced,found", [
    (gpu("NVIDIA A100-SXM4-40GB", 39.4), "h100_80gb", "GPU 'NVIDIA A100-SXM4-40GB' (39.4 GB)"),  # wrong partition
    ([], "h100_80gb", "no GPU"),                                          # a GPU tier on a CPU node
    (gpu("NVIDIA A100-SXM4-80GB", 79.2), "a100_40gb", "A100-SXM4-80GB"),   # same kind, other memory
    (gpu("NVIDIA H100 80GB HBM3", 79.1), "cpu", "H100"),                  # the CPU tier on a GPU node
    (gpu("NVIDIA L4", 22.0), "generic_large", "L4"),                      # a generic tier outside its memory range
])
def test_forced_tier_must_fit_the_node(gpus, forced, found):
    with pytest.raises(TierMismatch) as e:
        pick_tier(gpus, TIERS, forced)
    assert f"tier {forced!r} is forced" in str(e.value) and found in str(e.value)


def test_detect_fails_where_the_forced_tier_is_not_the_nodes(tmp_path, monkeypatch):
    """A run of config cluster.tiers that landed on the wrong node: a plain message naming the tier, the GPU found,
    the run, the host and the Slurm job, in the log too, and no tier.json for later stages to measure under."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg.update(run="local-h100_80gb", tier="h100_80gb")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(detect, "gpu_inventory", lambda: [])  # this CPU host, whatever it is
    monkeypatch.setenv("SLURM_JOB_PARTITION", "a100")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    out, log = tmp_path / "tier.json", tmp_path / "detect.log"
    with pytest.raises(SystemExit) as e:
        detect.main(["--config", str(tmp_path / "config.yaml"), "--out", str(out), "--log", str(log)])
    msg = str(e.value.code)
    for part in ("tier 'h100_80gb' is forced", "no GPU", "run 'local-h100_80gb'", "SLURM_JOB_PARTITION=a100",
                 "SLURM_JOB_ID=4242", "cluster.tiers"):
        assert part in msg, part
    assert not out.exists() and "tier 'h100_80gb' is forced" in log.read_text()
    cfg["tier"] = "cpu"  # the CPU tier forced on a CPU node goes through
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    detect.main(["--config", str(tmp_path / "config.yaml"), "--out", str(out)])
    assert json.loads(out.read_text())["tier"] == "cpu"


def test_plan_profiles_and_overrides():
    assert make_plan("h100_80gb", TIERS, {})["moe_backend"] == "grouped_mm"
    assert make_plan("h100_80gb", TIERS, {})["batch"] == 2
    assert make_plan("a100_40gb", TIERS, {})["bf16_viable"] is False
    assert make_plan("a100_40gb", TIERS, {})["moe_backend"] == "unsloth_triton"
    assert make_plan("cpu", TIERS, {"timed_steps": 3})["timed_steps"] == 3


def test_host_inventory_reads_this_host():
    h = host_inventory()
    assert h["cores"] >= 1 and h["ram_gb"] > 0
