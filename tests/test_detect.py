import pytest

from moebench import config as cfgmod
from moebench.detect import host_inventory, make_plan, pick_tier

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
    assert pick_tier([], TIERS, "h100_80gb")[0] == "h100_80gb"
    with pytest.raises(cfgmod.ConfigError, match="h900"):
        pick_tier([], TIERS, "h900")


def test_plan_profiles_and_overrides():
    assert make_plan("h100_80gb", TIERS, {})["moe_backend"] == "grouped_mm"
    assert make_plan("h100_80gb", TIERS, {})["batch"] == 2
    assert make_plan("a100_40gb", TIERS, {})["bf16_viable"] is False
    assert make_plan("a100_40gb", TIERS, {})["moe_backend"] == "unsloth_triton"
    assert make_plan("cpu", TIERS, {"timed_steps": 3})["timed_steps"] == 3


def test_host_inventory_reads_this_host():
    h = host_inventory()
    assert h["cores"] >= 1 and h["ram_gb"] > 0
