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


class FakeNvml:
    """NVML's process listing, scripted: each call returns the next list of (pid, bytes) on the GPU."""

    def __init__(self, listings, fail=None):
        self.listings, self.fail, self.calls = list(listings), fail, 0

    def nvmlInit(self):
        if self.fail:
            raise self.fail

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return f"gpu{i}"

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        from types import SimpleNamespace

        self.calls += 1
        procs = self.listings[min(self.calls, len(self.listings)) - 1]
        return [SimpleNamespace(pid=pid, usedGpuMemory=b) for pid, b in procs]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


def isolate(listings, wait=30, fail=None):
    c, clock = ctx(), Clock()
    reason = harness.isolate(c, wait, logging.getLogger("t-iso"), FakeNvml(listings, fail), clock.sleep, clock)
    return reason, {r.metric: r for r in c.rows}, clock.t


def test_isolation_waits_for_a_leaving_process_and_ignores_its_own():
    me = os.getpid()
    reason, rows, waited = isolate([[(4242, 2e9), (me, 1e9)], [(4242, 2e9)], [(me, 1e9)]])
    assert reason is None and rows["gpu_other_processes"].value == 0 and waited == 2.0
    assert rows["gpu_isolation_wait_s"].value == 2.0


def test_isolation_times_anyway_as_degraded_when_a_process_stays():
    reason, rows, waited = isolate([[(4242, 3.5e9)]], wait=5)
    assert waited >= 5 and rows["gpu_other_processes"].value == 1
    assert reason.startswith("GPU shared: 1 other process(es) still on it after isolation_wait_s=5 s")
    assert "pid 4242 (3.5 GB)" in reason


def test_isolation_unknown_where_nvml_cannot_list():
    reason, rows, _ = isolate([], fail=RuntimeError("NVML Shared Library Not Found"))
    assert reason is None and rows["gpu_other_processes"].status == "unavailable"
    assert rows["gpu_other_processes"].reason.startswith("unknown: NVML cannot list")


@pytest.mark.parametrize("iqr,flag", [(0.05, 0), (0.2, 1)])
def test_spread_flag_marks_but_keeps_an_unsteady_draw(iqr, flag):
    c = ctx()
    c.add("step_s", 1.0, "s", n=20, spread=iqr)
    harness.spread_rows(c, 0.10, logging.getLogger("t-spread"))
    rows = {r.metric: r for r in c.rows}
    assert rows["step_iqr_over_median"].value == pytest.approx(iqr)
    assert rows["spread_flag"].value == flag and rows["step_s"].status == "measured"
    assert ("IQR/median 0.200 > spread_limit 0.1" in rows["spread_flag"].reason) == bool(flag)


def test_no_spread_rows_without_a_measured_step():
    c = ctx()
    c.add("step_s", status="skipped", reason="needs CUDA")
    harness.spread_rows(c, 0.10, logging.getLogger("t-spread"))
    assert [r.metric for r in c.rows] == ["step_s"]


@pytest.fixture(scope="module")
def tiny_model():
    from conftest import _tiny_model

    return str(_tiny_model("gpt-oss-20b"))


def load_hf(model_dir, **plan):
    from moebench.arms.base import LoRASpec

    return arms.get("hf_bf16").load(model_dir, LoRASpec(r=4, alpha=4), {"seq_len": 64, **plan}).model


def test_conditions_read_from_the_loaded_model(tiny_model):
    from moebench import inspect

    plain = load_hf(tiny_model)
    c = inspect.conditions(plain, inspect.census(plain), {})
    assert c["attention"] == {"implementation": "eager", "requested": None}  # transformers' pick for GPT-OSS
    assert c["gradient_checkpointing"] == {"requested": None, "applied": False}
    assert c["dtypes"] == {"bias": ["bfloat16"], "lora": ["float32"], "norm": ["bfloat16"]}
    plan = {"hf_attention": "flex_attention", "gradient_checkpointing": True}
    asked = load_hf(tiny_model, **plan)
    c = inspect.conditions(asked, inspect.census(asked), plan)
    assert c["attention"] == {"implementation": "flex_attention", "requested": "flex_attention"}
    gc = c["gradient_checkpointing"]
    assert gc["applied"] and gc["function"] == "torch.utils.checkpoint.checkpoint"
    assert gc["kwargs"] == {"use_reentrant": "False"}
    assert inspect.compiled() == {"compiled": False, "frames": 0, "graphs": 0}  # nothing compiled the HF arm


def test_an_attention_the_model_lacks_is_a_skip_with_reason(tiny_model):
    with pytest.raises(arms.ArmUnavailable, match="hf_bf16: plan hf_attention=sdpa is not supported"):
        load_hf(tiny_model, hf_attention="sdpa")  # GPT-OSS's attention sinks: no SDPA path in transformers


def test_console_watch_uses_the_arms_patterns_and_asks_torch_for_recompile_lines(monkeypatch, capfd):
    monkeypatch.delenv("TORCH_LOGS", raising=False)
    cfg = {"degraded_patterns": {"unsloth_4bit": ["auto-tuning failed"], "all": ["hit config"]}, "recompile_limit": 3}
    with harness.console_watch(cfg, "unsloth_4bit") as m:
        os.write(2, b"MoE kernel auto-tuning failed\nan hf_bf16 line\ntorch._dynamo hit config.recompile_limit (8)\n")
    assert m.matches() == ["MoE kernel auto-tuning failed", "torch._dynamo hit config.recompile_limit (8)"]
    assert os.environ["TORCH_LOGS"] == "recompiles" and m.limit == 3
    assert "an hf_bf16 line" in capfd.readouterr().err


def test_console_tap_does_not_wait_for_a_child_that_lives_on(capfd):
    """torch's compile workers inherit fds 1 and 2 and outlive the draw: leaving the tap must not hang on them."""
    import time

    m = harness.ConsoleMatcher(["MAIN"])
    t0 = time.monotonic()
    with harness.ConsoleTap(m):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        os.write(1, b"MAIN line\n")
    try:
        assert time.monotonic() - t0 < 10 and m.matches() == ["MAIN line"]
    finally:
        child.kill()
        child.wait()
