"""The harness on CPU: a real training step per runnable arm, the skipped and failed paths, the FLOP model."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BACKGROUND_NICE, ROOT, in_background, tiny_workdir
from moebench import arms, harness, measure, models
from moebench import config as cfgmod
from moebench.io import write_json
from moebench.metrics import read_rows, parse_log_rows

SPEC = cfgmod.load_yaml("models.yaml")["gpt-oss-20b"]
QUICK_PLAN = {"seq_len": 64, "warmup_steps": 1, "timed_steps": 2}


CONFIG = ROOT / "config" / "config.yaml"
FAMILIES = ["qwen3-30b-a3b", "olmoe-1b-7b"]


def start_arm(d, arm, draw=1, config=CONFIG, tier="tier.json", model=None, out=None, nice=0) -> dict:
    """`python -m moebench.bench` for one draw, started (not waited for): its paths and process."""
    out = Path(out or d / "arms" / arm / f"draw{draw}")
    out.mkdir(parents=True, exist_ok=True)
    err = out.parent / f"draw{draw}.stderr"  # beside the draw: nothing a draw writes itself
    cmd = [*(["nice", "-n", str(nice)] if nice else []), sys.executable, "-m", "moebench.bench",
           "--config", str(config), "--tier", str(d / tier), "--model", str(model or d / "model"),
           "--data", str(d / "data" / "train.jsonl"), "--arm", arm, "--draw", str(draw),
           "--out", str(out / "metrics.csv"), "--log", str(out / "run.log")]
    with open(err, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f,
                                env={"PYTHONPATH": str(ROOT / "scripts"), "PATH": "/usr/bin:/bin"})
    return {"proc": proc, "out": out, "stderr": err}


def finish(job: dict, timeout: float = 300) -> tuple[dict, Path]:
    """Wait for a start_arm draw: it must exit 0; its metrics.csv rows by metric, and its directory."""
    try:
        rc = job["proc"].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        job["proc"].kill()
        raise
    assert rc == 0, job["stderr"].read_text()[-2000:]
    return {x.metric: x for x in read_rows(job["out"] / "metrics.csv")}, job["out"]


def run_arm(d, arm, draw=1, config=CONFIG, tier="tier.json"):
    return finish(start_arm(d, arm, draw, config, tier))


# ---- the module's real training draws, run beside the other tests ---------------------------------------------
_DRAWS: dict = {}


@in_background("draws")
def start_draws(tmp_path_factory) -> None:
    """The draws that train (hf_bf16 on each model family, the bare-loop and overrun variants) and a crashing load,
    started niced at the end of collection: ~70 s of CPU beside the other modules' tests. The tiny models are
    built here, in the main thread (transformers' lazy imports are not thread-safe)."""
    if "started" in _DRAWS:
        return
    _DRAWS["started"] = True
    try:
        d = tmp_path_factory.mktemp("b")
        tiny_workdir(d, **QUICK_PLAN)
        bare = variant(d, "bare", {"bare_loop_arms": ["hf_bf16"],
                                   "degraded_patterns": {"hf_bf16": ["Loading weights"]}})
        slow = variant(d, "slow", {"arm_timeout_s": 10}, {"timed_steps": 5000})
        bad = d / "not-a-model"
        bad.mkdir()
        (bad / "config.json").write_text("{}")  # not a model: the arm's load raises
        bg = {"nice": BACKGROUND_NICE}
        jobs = {"hf_bf16": start_arm(d, "hf_bf16", **bg), "bare": start_arm(d, "hf_bf16", 7, *bare, **bg),
                "slow": start_arm(d, "hf_bf16", 8, *slow, **bg),
                "crash": start_arm(d, "hf_bf16", model=bad, out=d / "crash", **bg)}
        _DRAWS.update(d=d, jobs=jobs)
        for name in FAMILIES:
            fd = tmp_path_factory.mktemp(name)
            tiny_workdir(fd, name, **QUICK_PLAN)
            jobs[name] = start_arm(fd, "hf_bf16", **bg)
            _DRAWS[name] = fd
    except BaseException as e:  # handed to the fixture
        _DRAWS["error"] = e


@pytest.fixture(scope="module")
def draws(tmp_path_factory):
    """What start_draws started (started now when collection did not)."""
    start_draws(tmp_path_factory)
    if "error" in _DRAWS:
        raise _DRAWS["error"]
    return _DRAWS


@pytest.fixture(scope="module")
def setup(draws):
    return draws["d"], cfgmod.load(CONFIG)


def test_registry_knows_every_configured_arm_and_imports_nothing_heavy():
    assert set(arms.REGISTRY) == {"hf_bf16", "hf_bnb4", "unsloth_bf16", "unsloth_4bit", "unsloth_fp8", "e4b_4bit"}
    for name in arms.REGISTRY:
        arm = arms.get(name)
        assert arm.name == name and not isinstance(arm, arms.Broken), getattr(arm, "error", "")
    assert "unsloth" not in sys.modules and "bitsandbytes" not in sys.modules
    with pytest.raises(KeyError, match="known arms"):
        arms.get("nope")


def test_hf_bf16_really_trains_on_cpu_with_expert_lora(draws):
    rows, out = finish(draws["jobs"]["hf_bf16"])
    assert rows["step_s"].status == "measured" and rows["step_s"].value > 0 and rows["step_s"].n == 2
    assert rows["tokens_per_s"].value == pytest.approx(64 / rows["step_s"].value)
    assert rows["expert_lora_params"].value > 0
    # adapters on every expert tensor of both layers, each with a non-zero gradient after the last step
    assert rows["layers_with_expert_lora"].value == 2
    assert rows["expert_lora_nonzero_grad"].value == rows["expert_lora_tensors"].value == 4 * 2
    assert rows["loss_first"].value > 0 and rows["loss_last"].value > 0
    # every number of metrics.csv is also a line of the run log (the audit re-derives it from there)
    logged = {r.metric: r.value for r in parse_log_rows(out / "run.log")}
    assert logged["step_s"] == rows["step_s"].value
    assert not any(r.status == "degraded" for r in rows.values())  # nothing this arm declares was printed
    env = json.loads((out / "env.json").read_text())
    assert env["packages"]["transformers"] == "5.17.0"
    # the conditions it really ran under, read from the model and the process, not from the plan
    cond = env["conditions"]
    assert cond["attention"]["implementation"] == "eager" and cond["optimizer"] == "torch.optim.adamw.AdamW"
    assert cond["compile"]["compiled"] is False and cond["dtypes"]["lora"] == ["float32"]
    assert "applied" in cond["gradient_checkpointing"]
    assert rows["spread_flag"].value in (0, 1) and rows["step_iqr_over_median"].value >= 0
    assert "gpu_other_processes" not in rows  # device isolation is a GPU matter
    # the machine is named, so an aggregate can tell draws of different machines apart
    assert env["host"]["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


@pytest.mark.parametrize("arm", ["hf_bnb4", "unsloth_bf16", "unsloth_4bit", "unsloth_fp8", "e4b_4bit"])
def test_gpu_arms_are_skipped_with_reason_on_cpu(setup, arm):
    d, _ = setup
    rows, _ = run_arm(d, arm)
    assert rows["step_s"].status == "skipped" and rows["step_s"].value is None
    assert "CUDA" in rows["step_s"].reason or "failed to import" in rows["step_s"].reason


def test_bf16_not_viable_tier_skips_bf16_arm():
    plan = {"bf16_viable": False}
    reason = harness.unavailable(arms.get("hf_bf16"), plan, cuda=False)
    assert "do not fit" in reason


def test_a_crashing_arm_is_a_failed_row_and_exit_0(draws):
    rows, out = finish(draws["jobs"]["crash"])  # exit 0
    step = rows["step_s"]
    assert step.status == "failed" and step.value is None and step.reason
    assert "Traceback" in (out / "run.log").read_text()


def test_flop_model_by_hand():
    from transformers import GptOssConfig

    cfg = GptOssConfig(num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2, hidden_size=8,
                       intermediate_size=4, num_attention_heads=2, num_key_value_heads=1, head_dim=4, vocab_size=10,
                       sliding_window=2, layer_types=["sliding_attention", "full_attention"])
    fm = measure.FlopModel.from_config(cfg, lora_r=1, lora_experts=True)
    assert fm.attn_params() == 8 * 8 + 2 * 8 * 4 + 8 * 8  # q, k, v, o
    assert fm.active_expert_params() == 2 * (8 * 8 + 4 * 8)  # top-2 of gate_up (8x2*4) and down (4x8)
    assert fm.frozen_active_params() == 2 * (192 + 192 + 8 * 4) + 8 * 10
    assert fm.lora_active_params() == 2 * (1 * ((8 + 8) + 2 * (8 + 4) + (8 + 8)) + 2 * 1 * ((8 + 8) + (4 + 8)))
    seq = 16
    attn = 4 * 2 * 4 * (1 * 8 + 1 * 2)  # full layer ctx seq/2 = 8, sliding ctx min(2, 8) = 2
    assert fm.attention_flops_per_token(seq) == attn
    P, L = fm.frozen_active_params(), fm.lora_active_params()
    expected = seq * ((2 * P + 2 * L + attn) + (2 * P + 4 * L + 2 * attn))
    assert fm.step_flops(seq, seq, recompute=False) == expected
    # recompute: the decoder layers' forward again, not the LM head (8 x 10)
    assert fm.step_flops(seq, seq, recompute=True) == expected + seq * (2 * (P - 8 * 10) + 2 * L + attn)


def test_full_gpt_oss_20b_active_params_are_about_3_6b():
    fm = measure.FlopModel.from_config(models.model_config(SPEC, "full"), lora_r=64)
    # the published active-parameter count of gpt-oss-20b is 3.6B (embedding excluded here, lm_head included)
    assert 3.0e9 < fm.frozen_active_params() < 4.2e9


def test_summary_median_and_iqr():
    s = measure.summary([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["median"] == 3.0 and s["iqr"] == 2.0 and s["n"] == 5
    with pytest.raises(ValueError):
        measure.summary([])


def variant(d, name, cfg_change=None, plan_change=None):
    """A config and tier file with some keys changed, for one test."""
    import yaml

    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg.update(cfg_change or {})
    (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    tier = json.loads((d / "tier.json").read_text())
    tier["plan"].update(plan_change or {})
    write_json(d / f"{name}.tier.json", tier)
    return d / f"{name}.yaml", f"{name}.tier.json"


def test_bare_loop_check_and_a_console_fallback_in_one_draw(draws):
    """One draw, two checks: the bare-loop comparison, and a declared console line (transformers' own load
    progress bar, printed to fd 2 by a third party) turning the draw's measured rows `degraded`."""
    rows, out = finish(draws["jobs"]["bare"])  # config "bare" of _start_draws
    assert rows["bare_loop_step_s"].value > 0
    assert rows["harness_over_bare"].value == pytest.approx(rows["step_s"].value / rows["bare_loop_step_s"].value)
    assert rows["step_s"].status == "degraded" and rows["step_s"].reason.startswith("console: Loading weights")
    assert all(r.status != "measured" for r in rows.values())
    assert "degraded: console: Loading weights" in (out / "run.log").read_text()


def test_overrunning_draw_becomes_failed_row(draws):
    rows, out = finish(draws["jobs"]["slow"])  # arm_timeout_s 10, 5000 timed steps (_start_draws)
    reason = rows["step_s"].reason
    assert rows["step_s"].status == "failed" and "arm_timeout_s=10" in reason
    # where the draw was when it ran out of time (imports and load take ~8 s; on a loaded 2-core host longer)
    assert re.search(r"\(in (loading the model|warm-up step \d+ \(of .*\)|5000 timed steps.*), \d+ s in\)", reason)
    if "timed steps" in reason:
        assert rows["load_s"].status == "measured"  # what was measured before the overrun stays
        assert rows["first_step_s"].value > 0  # the warm-up's first step, compile time included


def test_progress_reports_a_long_phase_while_it_lasts(caplog):
    """A first step that compiles for minutes shows in the log as it happens, not only when it ends."""
    import logging
    import time

    from moebench.harness import Progress

    log = logging.getLogger("test-progress")
    with caplog.at_level(logging.INFO, logger="test-progress"):
        progress = Progress(log, every=0.05, phase="warm-up step 1/3")
        with progress.beating():
            time.sleep(0.3)
        beats = [r.getMessage() for r in caplog.records if r.getMessage().startswith("still working:")]
        time.sleep(0.2)  # the beat stops with the phase's block
        assert len([r for r in caplog.records if r.getMessage().startswith("still working:")]) == len(beats)
    assert len(beats) >= 2 and beats[0].startswith("still working: warm-up step 1/3, ")


@pytest.mark.parametrize("name", FAMILIES)
def test_other_families_train_with_expert_lora_and_report_router_load(draws, name):
    """Qwen3-MoE and OLMoE go through the same harness: expert LoRA on every layer, the router load measured."""
    rows, _ = finish(draws["jobs"][name])
    assert rows["step_s"].status == "measured" and rows["model_tflop_per_step"].value > 0
    assert rows["layers_with_expert_lora"].value == 2
    assert rows["expert_lora_nonzero_grad"].value == rows["expert_lora_tensors"].value == 4 * 2
    assert rows["router_max_over_mean"].value >= 1.0 and 0 < rows["router_entropy_norm"].value <= 1.0
    assert run_arm(draws[name], "e4b_4bit", draw=2)[0]["step_s"].status == "skipped"  # needs CUDA


def test_frozen_warmup_sets_lr_0_before_the_first_step(tmp_path, monkeypatch):
    """plan frozen_warmup: the optimizer is frozen before any step (so the calibrated routing never drifts) and
    both flags say so in the draw's rows."""
    import logging

    from moebench import bench

    tier = tiny_workdir(tmp_path, seq_len=16, batch=1, warmup_steps=1, warmup_max=1, timed_steps=2,
                        frozen_warmup=True)
    events, step, freeze = [], harness.train_step, harness.freeze
    monkeypatch.setattr(harness, "train_step", lambda m, o, x: events.append(("step", o.param_groups[0]["lr"]))
                        or step(m, o, x))
    monkeypatch.setattr(harness, "freeze", lambda o: events.append(("freeze", None)) or freeze(o))
    cfg = cfgmod.load(ROOT / "config" / "config.yaml")
    ctx = harness.Ctx("r", "cpu", "tiny", "hf_bf16", "bf16", 1, str(tmp_path / "draw" / "run.log"))
    bench.run(ctx, arms.get("hf_bf16"), cfg, tier, str(tmp_path / "model"), str(tmp_path / "data" / "train.jsonl"),
              logging.getLogger("t"), bare_loop=False)
    assert events[0] == ("freeze", None) and all(lr == 0.0 for kind, lr in events if kind == "step")
    rows = {r.metric: r for r in ctx.rows}
    assert rows["frozen_warmup"].value == 1.0 and rows["frozen_timed"].value == 1.0
