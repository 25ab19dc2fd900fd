"""Training validation: every gate fails on a run built to fail it, passes on one that learns; a real SFT
fine-tune of the tiny model on CPU; the verdict that joins speed and training health."""
import copy
import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_workdir
from moebench import arms, harness, routing
from moebench import config as cfgmod
from moebench import validate as V
from moebench import verdict as VD
from moebench.metrics import parse_log_rows, read_rows

FALLING = [3.0 - 0.1 * i for i in range(20)]


# ---- gates as pure functions ----------------------------------------------------------------------------------
def test_finite_gate_fails_on_any_nan_or_inf():
    assert V.gate_finite(FALLING, [1.0] * 20, [2.0, 1.9]).passed
    assert not V.gate_finite(FALLING[:5] + [math.nan] + FALLING[6:], [1.0] * 20, [2.0, 1.9]).passed
    assert not V.gate_finite(FALLING, [1.0, math.inf], [2.0, 1.9]).passed
    assert not V.gate_finite(FALLING, [1.0] * 20, [2.0, math.nan]).passed
    g = V.gate_finite(FALLING, [1.0] * 20, [2.0, 1.9], nonfinite_grad_steps=2)
    assert not g.passed and g.value == 2.0
    assert not V.gate_finite([], [], []).passed  # nothing recorded is no evidence


def test_loss_drop_gate_needs_the_margin():
    g = V.gate_loss_drop(FALLING, window=10, min_drop=0.02)
    first, last = sum(FALLING[:10]) / 10, sum(FALLING[-10:]) / 10
    assert g.passed and g.value == pytest.approx(1 - last / first)
    flat = V.gate_loss_drop([2.5] * 20, 10, 0.0)
    assert not flat.passed and flat.value == 0.0  # flat fails even with no margin
    assert not V.gate_loss_drop(FALLING[::-1], 10, 0.005).passed  # rising
    assert not V.gate_loss_drop(FALLING, 10, 0.9).passed  # falls, but by less than asked
    nan = V.gate_loss_drop([math.nan] + FALLING[1:], 10, 0.005)
    assert not nan.passed and nan.value is None
    assert not V.gate_loss_drop([3.0], 10, 0.0).passed
    assert V.window_means(FALLING[:12], 10)[0] == 6  # windows never overlap on a short run


def test_heldout_gate_needs_a_strict_fall():
    assert V.gate_heldout(2.0, 1.9, 0.0).passed
    assert not V.gate_heldout(2.0, 2.0, 0.0).passed  # unchanged is not learning
    assert not V.gate_heldout(2.0, 2.1, 0.0).passed
    assert not V.gate_heldout(2.0, 1.99, 0.05).passed
    assert not V.gate_heldout(2.0, math.nan, 0.0).passed


def _layers(n=2, tensors=4, experts=8):
    return {l: {"tensors": tensors, "tensors_with_grad": tensors, "experts": experts, "experts_with_grad": experts}
            for l in range(n)}


def test_expert_grad_gate_fails_on_frozen_or_missing_experts():
    assert V.gate_expert_grads(_layers(), 2).passed
    frozen = _layers()
    frozen[1]["tensors_with_grad"] = 0
    g = V.gate_expert_grads(frozen, 2)
    assert not g.passed and g.value == 0.0 and "layer 1: 0/4" in g.detail
    one_expert = _layers()
    one_expert[0]["experts_with_grad"] = 7
    assert not V.gate_expert_grads(one_expert, 2).passed
    assert V.gate_expert_grads(one_expert, 2, min_expert_fraction=0.8).passed
    assert not V.gate_expert_grads(_layers(n=1), 2).passed  # a layer without expert LoRA
    assert not V.gate_expert_grads({}, 2).passed


def test_reload_gate():
    assert V.gate_reload(0.0, 5.0, 0.01, fresh_diff=0.5).passed
    assert not V.gate_reload(0.2, 5.0, 0.01, fresh_diff=0.5).passed
    # the bound is relative to the logits' scale: 0.04 of 5.0 passes, 0.009 of 0.5 does not
    assert V.gate_reload(0.04, 5.0, 0.01, fresh_diff=0.5).passed
    assert not V.gate_reload(0.009, 0.5, 0.01, fresh_diff=0.5).passed
    assert not V.gate_reload(0.0, 5.0, 0.01, fresh_diff=0.0).passed  # the adapter changed nothing: proves nothing
    assert not V.gate_reload(math.nan, 5.0, 0.01).passed
    # equal logits but an adapter that did not round-trip (a tensor lost or changed): fails
    assert not V.gate_reload(0.0, 5.0, 0.01, fresh_diff=0.5, adapter_diff=1e-3).passed
    assert not V.gate_reload(0.0, 5.0, 0.01, fresh_diff=0.5, adapter_diff=math.inf).passed


def test_adapter_round_trip_diff_sees_values_dtypes_and_missing_tensors():
    import torch

    a = {"x": torch.ones(3), "y": torch.zeros(2, dtype=torch.bfloat16)}
    assert V.adapter_max_diff(a, {k: v.clone() for k, v in a.items()}) == 0.0
    assert V.adapter_max_diff(a, {"x": torch.ones(3) * 2, "y": a["y"]}) == 1.0
    assert V.adapter_max_diff(a, {"x": a["x"], "y": a["y"].float()}) == math.inf  # dtype changed on the way
    assert V.adapter_max_diff(a, {"x": a["x"]}) == math.inf  # one lost


def test_validation_packs_the_data_itself_and_refuses_a_trainer_that_repacks():
    """Every stack gets the same packed blocks (bench's token stream cut at seq_len); a trainer whose datasets
    no longer hold them (Unsloth ignoring packing=True for gpt_oss) stops the run instead of training on other
    tokens."""
    from types import SimpleNamespace

    class Tok:
        eos_token_id = 0

        def __call__(self, text):
            return {"input_ids": [ord(c) for c in text]}

    blocks = V.packed(Tok(), ["abc", "defg"], 4)
    assert blocks == [{"input_ids": [97, 98, 99, 0]}, {"input_ids": [100, 101, 102, 103]}, {"input_ids": [0]}]
    V.same_data(SimpleNamespace(train_dataset=blocks, eval_dataset=blocks[:1]), blocks, blocks[:1])
    unpacked = SimpleNamespace(train_dataset=[{"input_ids": [97, 98, 99]}, {"input_ids": [100]}],
                               eval_dataset=blocks[:1])
    with pytest.raises(RuntimeError, match="changed the packed train data"):
        V.same_data(unpacked, blocks, blocks[:1])


def test_router_summary():
    even = routing.summary([10, 10, 10, 10])
    assert even["entropy_norm"] == pytest.approx(1.0) and even["max_over_mean"] == pytest.approx(1.0)
    collapsed = routing.summary([40, 0, 0, 0])
    assert collapsed["entropy"] == 0 and collapsed["max_over_mean"] == 4 and collapsed["unused"] == 3
    assert routing.summary([0, 0])["entropy"] is None


def _doc(status="measured", passed=True, failing=()):
    gates = [{"name": n, "passed": n not in failing, "detail": f"{n} detail"} for n in
             ("finite", "loss_drop", "heldout_drop", "expert_grads", "reload")]
    return {"status": status, "reason": "" if status == "measured" else "needs CUDA", "passed": passed,
            "gates": gates if status == "measured" else []}


def test_overall_verdict_needs_speed_and_training():
    viable = {"verdict": "VIABLE", "reason": "unsloth_bf16 is 2.14x unsloth_4bit", "speedup": 2.14,
              "reference": "unsloth_4bit"}
    assert VD.overall_verdict(viable, {"unsloth_bf16": _doc()})["verdict"] == "VIABLE"
    bad = VD.overall_verdict(viable, {"unsloth_bf16": _doc(passed=False, failing=("loss_drop",))})
    assert bad["verdict"] == "NOT VIABLE" and "loss_drop" in bad["reason"] and bad["speed_verdict"] == "VIABLE"
    assert VD.overall_verdict(viable, {"unsloth_bf16": _doc("skipped", None)})["verdict"] == "NOT TESTABLE"
    assert VD.overall_verdict(viable, {})["verdict"] == "NOT TESTABLE"
    slow = {**viable, "verdict": "NOT VIABLE", "speedup": 1.1}
    assert VD.overall_verdict(slow, {"unsloth_bf16": _doc()})["verdict"] == "NOT VIABLE"
    untestable = {"verdict": "NOT TESTABLE", "reason": "unsloth_bf16 skipped", "reference": None}
    assert VD.overall_verdict(untestable, {"unsloth_bf16": _doc()})["verdict"] == "NOT TESTABLE"
    # another arm failing its fine-tune is recorded; the reference failing voids the comparison
    noted = VD.overall_verdict(viable, {"unsloth_bf16": _doc(), "e4b_4bit": _doc(passed=False, failing=("finite",))})
    assert noted["verdict"] == "VIABLE" and noted["training"]["e4b_4bit"]["result"] == "FAIL"
    void = VD.overall_verdict(viable, {"unsloth_bf16": _doc(), "unsloth_4bit": _doc(passed=False, failing=("finite",))})
    assert void["verdict"] == "NOT TESTABLE" and "unsloth_4bit's training fails" in void["reason"]


def test_a_reload_measured_by_the_superseded_check_counts_as_not_measured():
    """gates.json documents whose rows lack the plain-forward row had their reload measured against the trainer's
    autocast forward: that gate is void (UNVERIFIED), other failures still fail, a new document is judged as is."""
    from moebench.metrics import Row

    def row(arm, metric):
        return Row("r", "h100_80gb", "m", arm, "bf16", "validate", metric, 0.0, "logit", source="x.log")

    docs = {"new": _doc(), "old": _doc(passed=False, failing=("reload",)),
            "old_bad": _doc(passed=False, failing=("reload", "finite")), "gone": _doc("skipped", None)}
    marked = VD.mark_superseded(docs, [row("new", VD.PLAIN_FORWARD_ROW), row("old", "gate_reload")])
    assert "reload_superseded" not in marked["new"] and "reload_superseded" not in marked["gone"]
    t = {a: VD._arm_training(d) for a, d in marked.items()}
    assert t["new"]["result"] == "PASS" and t["gone"]["result"] == "SKIPPED"
    assert t["old"] == {"result": "UNVERIFIED", "why": VD.SUPERSEDED, "gates": [
        "finite", "loss_drop", "heldout_drop", "expert_grads", "reload (superseded)"]}
    assert t["old_bad"]["result"] == "FAIL" and "reload" not in t["old_bad"]["why"]
    viable = {"verdict": "VIABLE", "reason": "fast", "reference": "e4b_4bit"}
    v = VD.overall_verdict(viable, {"unsloth_bf16": marked["old"]})
    assert v["verdict"] == "NOT TESTABLE" and "superseded" in v["reason"]


def test_settings_per_host():
    plan = {"seq_len": 4096, "batch": 2}
    gpu = V.run_settings({}, plan, cuda=True)
    assert gpu["steps"] == 100 and gpu["optim"] == "adamw_8bit" and gpu["seq_len"] == 4096 and gpu["bf16"]
    slow = V.run_settings({"arm_steps": {"e4b_4bit": 30}}, plan, cuda=True, arm="e4b_4bit")
    assert slow["steps"] == 30 and V.run_settings({"arm_steps": {"e4b_4bit": 30}}, plan, True, "hf_bf16")["steps"] == 100
    assert V.run_settings({"arm_steps": {"e4b_4bit": 30}}, plan, False, "e4b_4bit")["steps"] == 12  # CPU: cpu_steps
    cpu = V.run_settings({"cpu_steps": 5}, plan, cuda=False)
    assert cpu["steps"] == 5 and cpu["optim"] == "adamw_torch" and cpu["seq_len"] == 128 and not cpu["bf16"]


def test_defaults_are_the_schema_defaults():
    """validate.py's defaults (used in-process) and the config schema's must not drift apart."""
    cfg = cfgmod.load(ROOT / "config" / "config.yaml")
    assert cfg["validate"] == {**V.DEFAULTS, **cfg["validate"]}
    import yaml

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    props = schema["properties"]["validate"]["properties"]
    assert {k: p.get("default") for k, p in props.items()} == V.DEFAULTS


# ---- the tiny model: gradients, router load, a real fine-tune ------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("v")
    tier = tiny_workdir(d, conversations=12)
    cfg = cfgmod.load(ROOT / "config" / "config.yaml")
    cfg["validate"] = {**cfg.get("validate", {}), "cpu_steps": 8, "grad_accum": 1, "cpu_seq_len": 64, "lr": 3e-3,
                       "window": 3, "min_loss_drop": 0.005, "warmup_ratio": 0.0, "reload_tokens": 32}
    return d, cfg, tier


def _loaded(d, cfg):
    import torch

    torch.manual_seed(0)
    return arms.get("hf_bf16").load(str(d / "model"), harness.lora_spec(cfg), {"seq_len": 64}).model


def _step(model, rec):
    import torch

    x = torch.randint(0, 4096, (1, 48), generator=torch.Generator().manual_seed(1))
    rec.counting = True
    model(input_ids=x, labels=x).loss.backward()
    rec.counting = False
    rec.on_step()
    return x


def test_recorder_sees_every_expert_and_frozen_ones(setup):
    import torch

    d, cfg, _ = setup
    model = _loaded(d, cfg)
    for t in V.expert_lora_tensors(model):  # lora_B starts at zero, so lora_A gets no gradient on step 1
        if t["kind"] == "B":
            torch.nn.init.normal_(t["param"], std=0.02)
    rec = V.Recorder(model, 8, 4)
    assert len(rec.experts) == 8 and {t["kind"] for t in rec.experts} == {"A", "B"}
    x = _step(model, rec)
    table = rec.layer_table()
    assert table == {0: {"tensors": 4, "tensors_with_grad": 4, "experts": 8, "experts_with_grad": 8},
                     1: {"tensors": 4, "tensors_with_grad": 4, "experts": 8, "experts_with_grad": 8}}
    assert V.gate_expert_grads(table, 2).passed
    counts = rec.router_counts()
    assert sorted(counts) == [0, 1] and all(sum(c) == x.numel() * 4 for c in counts.values())
    rec.remove()

    # frozen experts: the adapters are there but never train
    model.zero_grad(set_to_none=True)
    for t in V.expert_lora_tensors(model):
        t["param"].requires_grad_(False)
    rec = V.Recorder(model, 8, 4)
    _step(model, rec)
    g = V.gate_expert_grads(rec.layer_table(), 2)
    assert not g.passed and "0/4 expert LoRA tensors" in g.detail
    rec.remove()

    # one expert's slice gets no gradient (e.g. never routed): the per-expert view catches it
    for t in V.expert_lora_tensors(model):
        t["param"].requires_grad_(True)
    model.zero_grad(set_to_none=True)
    rec = V.Recorder(model, 8, 4)
    x = torch.randint(0, 4096, (1, 48))
    model(input_ids=x, labels=x).loss.backward()
    for t in rec.experts:
        g = t["param"].grad
        if t["kind"] == "A":
            g.view(8, -1, g.shape[-1])[3] = 0
        else:
            g.view(g.shape[0], -1, 8)[..., 3] = 0
    rec.on_step()
    table = rec.layer_table()
    assert table[0]["tensors_with_grad"] == 4 and table[0]["experts_with_grad"] == 7
    assert not V.gate_expert_grads(table, 2).passed


def _run(setup, tmp_path, name, arm="hf_bf16", **change):
    d, cfg, tier = setup
    cfg = copy.deepcopy(cfg)
    cfg["validate"].update(change)
    out = tmp_path / name
    doc = V.validate_arm(cfg, tier, arm, str(d / "model"), str(d / "data" / "train.jsonl"),
                         str(d / "data" / "heldout.jsonl"), out, str(out / "run.log"))
    return doc, {g["name"]: g for g in doc["gates"]}, out


def test_overrunning_validation_fails_naming_its_setting_and_phase(setup, tmp_path, monkeypatch):
    """A fine-tune past validate.timeout_s is a failed arm whose reason says which setting to raise and where it
    was; the outputs the rule declares exist and say why (no fake curve). The fine-tune is made to hang, so the
    alarm lands there and not in a half-done import that later tests would inherit."""
    import time

    monkeypatch.setattr(V, "fine_tune", lambda *a, **k: time.sleep(120))
    doc, gates, out = _run(setup, tmp_path, "slow", timeout_s=5)  # the tiny model loads in ~1 s
    assert doc["status"] == "failed" and not gates
    assert doc["reason"].startswith("ArmTimeout: draw exceeded validate.timeout_s=5 s (in fine-tuning ("), doc["reason"]
    assert (out / "loss.csv").read_text() == "step,loss\n" and (out / "adapter" / "NO_ADAPTER.txt").exists()
    rows = {r.metric: r for r in read_rows(out / "metrics.csv")}
    assert rows["gates_passed"].status == "failed"


def test_real_cpu_fine_tune_learns_and_passes_every_gate(setup, tmp_path):
    doc, gates, out = _run(setup, tmp_path, "learn")
    assert doc["status"] == "measured", doc.get("reason")
    assert all(g["passed"] for g in gates.values()), gates
    assert doc["passed"] is True and set(gates) == {"finite", "loss_drop", "heldout_drop", "expert_grads", "reload"}
    rows = {r.metric: r for r in read_rows(out / "metrics.csv")}
    assert rows["gates_passed"].value == 1.0 and rows["optimizer_steps"].value == 8
    assert rows["heldout_loss_after"].value < rows["heldout_loss_before"].value
    # loss.csv (what the report draws) is the trainer's per-step loss, the same numbers as the rows
    lines = (out / "loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss" and len(lines) == 9
    assert float(lines[-1].split(",")[1]) == rows["loss_step_0008"].value
    # every row is in the log, with the log as its source (the audit re-derives them from there)
    logged = {r.metric: r for r in parse_log_rows(out / "run.log")}
    assert logged.keys() == rows.keys() and all(r.source == str(out / "run.log") for r in rows.values())
    assert all(r.stage == "validate" and r.draw is None for r in rows.values())
    assert rows["router_tokens_L00"].value > 0 and 0 < rows["router_entropy_norm_L01"].value <= 1
    assert (out / "adapter" / "adapter_config.json").exists()
    assert rows["reload_fresh_logits_max_abs_diff"].value > rows["reload_logits_max_abs_diff"].value
    gj = json.loads((out / "gates.json").read_text())
    assert gj["arm"] == "hf_bf16" and gj["settings"]["optim"] == "adamw_torch" and gj["router"]["0"]["tokens"] > 0
    # each validation says what it ran on, as a bench draw's env.json does
    env = gj["environment"]
    assert env["platform"] and env["packages"]["torch"] and "gpu" in env and env["started"] <= env["ended"]


def test_bf16_mixed_precision_reload_compares_plain_forwards(setup, tmp_path, monkeypatch):
    """The H100 failure, on CPU: the trainer's accelerator wraps the model's forward in bf16 autocast. The reload
    check compares the trained model's plain forward with the reloaded one (exact here), and records how far the
    autocast forward it trained with is from it (what the first GPU runs measured as a reload difference)."""
    settings = V.run_settings
    monkeypatch.setattr(V, "run_settings", lambda *a, **k: {**settings(*a, **k), "bf16": True, "use_cpu": True})
    doc, gates, out = _run(setup, tmp_path, "bf16", cpu_steps=2)  # what it checks needs a trained adapter only
    assert doc["status"] == "measured", doc.get("reason")
    rows = {r.metric: r.value for r in read_rows(out / "metrics.csv")}
    assert rows["reload_trained_autocast_max_abs_diff"] > 0  # the wrapper was there and changes the logits
    assert gates["reload"]["passed"] and rows["reload_logits_max_abs_diff"] == 0.0
    assert rows["reload_adapter_max_abs_diff"] == 0.0 and rows["reload_routing_flips"] == 0.0
    assert rows["reload_loss_trained"] == rows["reload_loss_reloaded"]


def test_real_run_with_a_damaged_adapter_fails_the_reload_gate(setup, tmp_path, monkeypatch):
    """A saved adapter that lost part of what was trained (one expert LoRA B zeroed in the file) fails reload."""
    from safetensors.torch import load_file, save_file

    save = V.save_adapter

    def damaged(model, out):
        kind = save(model, out)
        f = out / "adapter_model.safetensors"
        sd = load_file(str(f))
        k = next(k for k in sorted(sd) if "experts" in k and "lora_B" in k)
        sd[k] = sd[k] * 0
        save_file(sd, str(f))
        return kind

    monkeypatch.setattr(V, "save_adapter", damaged)
    doc, gates, out = _run(setup, tmp_path, "damaged")
    assert doc["status"] == "measured" and doc["passed"] is False
    assert not gates["reload"]["passed"] and "did not round-trip" in gates["reload"]["detail"]
    assert all(gates[g]["passed"] for g in ("finite", "loss_drop", "heldout_drop", "expert_grads"))


def test_real_run_with_flat_loss_fails_the_learning_gates(setup, tmp_path):
    doc, gates, out = _run(setup, tmp_path, "flat", lr=0.0, cpu_steps=6)
    assert doc["status"] == "measured" and doc["passed"] is False
    assert not gates["loss_drop"]["passed"] and not gates["heldout_drop"]["passed"]
    assert gates["heldout_drop"]["value"] == 0.0  # not one weight moved
    assert gates["finite"]["passed"]
    assert {r.metric: r.value for r in read_rows(out / "metrics.csv")}["gates_passed"] == 0.0


class NaNArm(arms.get("hf_bf16").__class__):
    """hf_bf16 with NaN injected into layer 0's experts from the third training forward on."""

    def load(self, model_dir, lora, plan):
        import torch

        loaded = super().load(model_dir, lora, plan)
        calls = {"n": 0}

        def poison(mod, inp, out):
            if mod.training:
                calls["n"] += 1
                if calls["n"] >= 3:
                    return out * torch.tensor(float("nan"), dtype=out.dtype)
            return out

        loaded.model.base_model.model.model.layers[0].mlp.experts.register_forward_hook(poison)
        return loaded


def test_real_run_with_injected_nan_fails_the_finite_gate(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(V.arm_registry, "get", lambda name: NaNArm())
    doc, gates, out = _run(setup, tmp_path, "nan", cpu_steps=4)
    assert doc["status"] == "measured" and doc["passed"] is False
    assert not gates["finite"]["passed"] and gates["finite"]["value"] >= 2
    rows = {r.metric: r for r in read_rows(out / "metrics.csv")}
    assert rows["loss_step_0001"].status == "measured"
    assert rows["loss_step_0004"].status == "failed" and rows["loss_step_0004"].value is None  # never a number
    assert "nan" in (out / "loss.csv").read_text()


def test_gpu_arm_is_skipped_with_reason_and_every_output_exists(setup, tmp_path):
    d, _, _ = setup
    out = tmp_path / "skip"
    r = subprocess.run([sys.executable, "-m", "moebench.validate", "--config", str(ROOT / "config" / "config.yaml"),
                        "--tier", str(d / "tier.json"), "--model", str(d / "model"),
                        "--train", str(d / "data" / "train.jsonl"), "--heldout", str(d / "data" / "heldout.jsonl"),
                        "--arm", "hf_bnb4", "--out-dir", str(out), "--log", str(out / "run.log")],
                       capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT / "scripts"), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = read_rows(out / "metrics.csv")
    assert row.status == "skipped" and row.value is None and "CUDA" in row.reason and row.stage == "validate"
    assert [(r.metric, r.status, r.reason) for r in parse_log_rows(out / "run.log")] == \
        [(row.metric, row.status, row.reason)]
    gj = json.loads((out / "gates.json").read_text())
    assert gj["status"] == "skipped" and gj["passed"] is None and gj["gates"] == []
    assert (out / "loss.csv").read_text() == "step,loss\n"  # no curve, never a fake one
    assert "CUDA" in (out / "adapter" / "NO_ADAPTER.txt").read_text()
