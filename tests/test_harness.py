"""The shared harness without a model: degraded-path detection on committed consoles, the console tap, the
skipped/failed guard, device isolation with a fake NVML, the spread flag and the census."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from moebench import arms, harness
from moebench import config as cfgmod

CONSOLES = Path(__file__).parent / "fixtures" / "consoles"
CFG = cfgmod.load(ROOT / "config" / "config.yaml")


def matches(name: str, arm: str, limit=CFG["recompile_limit"]) -> list[str]:
    return harness.degraded_matches((CONSOLES / name).read_text(), harness.arm_patterns(CFG, arm), limit)


def test_unsloth_4bit_autotune_failure_on_qwen3_is_found():
    found = matches("qwen3_h200_unsloth_4bit.log", "unsloth_4bit")
    assert any("MoE kernel auto-tuning failed" in m for m in found)
    assert any("Using default MoE kernel configurations (not optimal)" in m for m in found)


def test_unsloth_bf16_block_compile_fallback_on_qwen3_is_found():
    found = matches("qwen3_h200_unsloth_bf16.log", "unsloth_bf16")
    assert len(found) == 2 and "keeping the stock forward for this layer" in found[1]


def test_a_clean_unsloth_console_and_the_other_arms_match_nothing():
    assert matches("olmoe_h100_unsloth_4bit.log", "unsloth_4bit") == []
    # the patterns are the arm's own: an HF arm does not inherit Unsloth's
    assert "MoE kernel auto-tuning failed" not in " ".join(harness.arm_patterns(CFG, "hf_bf16"))


def test_moebench_quoting_a_pattern_in_its_own_log_is_no_fallback():
    text = (CONSOLES / "gptoss_h200_unsloth_4bit_refused.log").read_text()
    assert "no quant_state found" in text
    assert matches("gptoss_h200_unsloth_4bit_refused.log", "unsloth_4bit") == []
    # the same words printed by a library are one
    assert harness.degraded_matches("bnb: no quant_state found for layer 3\n", ["no quant_state found"])


def test_recompile_storm_counts_per_function_against_the_limit():
    found = matches("synthetic_dynamo_recompiles.log", "hf_bf16", limit=2)
    assert any("hit config.recompile_limit" in m for m in found)  # torch's own give-up warning, any limit
    storms = [m for m in found if m.startswith("torch recompiled")]
    assert len(storms) == 1 and "forward in" in storms[0] and "3 times" in storms[0]
    assert not any(m.startswith("torch recompiled") for m in matches("synthetic_dynamo_recompiles.log", "hf_bf16"))
    assert harness.degraded_matches((CONSOLES / "synthetic_dynamo_recompiles.log").read_text(), [], None) == []


def test_a_bad_pattern_is_named():
    with pytest.raises(ValueError, match=r"degraded_patterns: '\(' is not a regular expression"):
        harness.degraded_matches("x", ["("])


def test_console_tap_sees_third_party_and_child_prints_and_passes_them_on(capfd):
    m = harness.ConsoleMatcher(["Using default MoE kernel", "FALLBACK"], keep=5)
    with harness.ConsoleTap(m):  # (pytest's sys.stdout bypasses fd 1: descriptor writes and children here)
        os.write(1, b"plain stdout line\n")
        subprocess.run([sys.executable, "-c", "import sys; print('[unsloth.kernels.moe.autotune_cache|WARNING]"
                        "Using default MoE kernel configurations', file=sys.stderr); print('child FALLBACK')"],
                       check=True)
        os.write(1, b"C-level FALLBACK without newline at exit")
    out, err = capfd.readouterr()
    assert "plain stdout line" in out and "child FALLBACK" in out and "C-level FALLBACK" in out
    assert "Using default MoE kernel" in err  # stderr stays stderr
    assert sorted(m.matches()) == sorted(["[unsloth.kernels.moe.autotune_cache|WARNING]Using default MoE kernel "
                                          "configurations", "C-level FALLBACK without newline at exit",
                                          "child FALLBACK"])
    print("after the tap")  # the descriptors are back
    assert "after the tap" in capfd.readouterr().out


def ctx():
    return harness.Ctx("r", "cpu", "m", "unsloth_4bit", "nf4", 1, "run.log")


def test_a_matched_draw_keeps_its_values_as_degraded_rows():
    c = ctx()
    c.add("step_s", 1.5, "s")
    c.add("router_max_over_mean", status="unavailable", reason="no router")
    reason = harness.console_reason(matches("qwen3_h200_unsloth_4bit.log", "unsloth_4bit"))
    assert reason.startswith("console: [unsloth.kernels.moe.autotune_cache|ERROR]MoE kernel auto-tuning failed")
    harness.mark_degraded(c, reason)
    step, router = c.rows
    assert step.status == "degraded" and step.value == 1.5 and step.reason == reason
    assert router.status == "unavailable" and router.reason == "no router"
    harness.mark_degraded(c, None)  # nothing matched: nothing changes
    assert c.rows[0].reason == reason


def test_guard_turns_unavailable_and_crashes_into_rows():
    log = logging.getLogger("t-guard")
    c = ctx()
    assert harness.guarded(c, log, lambda p: 7, 60).result == 7
    out = harness.guarded(c, log, lambda p: (_ for _ in ()).throw(arms.ArmUnavailable("no CUDA")), 60)
    assert (out.status, c.rows[-1].status, c.rows[-1].reason) == ("skipped", "skipped", "no CUDA")

    def oom(progress):
        c.add("step_s", 2.0, "s")
        raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
    out = harness.guarded(c, log, oom, 60)
    assert out.status == "failed" and c.rows[-1].metric == "error"  # step_s was measured before the crash
    assert c.rows[-1].reason.startswith("OOM: CUDA out of memory")
    assert harness.guarded(c, log, lambda p: 1, 60, skip="tier says no").status == "skipped"
