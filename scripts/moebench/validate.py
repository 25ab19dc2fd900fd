"""Training validation: does each arm really learn? A real LoRA fine-tune per arm with TRL's SFTTrainer, judged
by quality gates, each recorded pass/fail with the value it rests on.

One arm per process, loaded through the arm's own path (`arm.load`), trained on the synthetic Harmony data with
packing, gradient accumulation, a cosine schedule with warm-up and 8-bit AdamW on a GPU (torch AdamW on CPU,
where bitsandbytes' optimizer cannot run). Gates (pure functions in gates.py, so a test can build a run that
fails each):
  finite        no NaN/Inf training loss, gradient norm or held-out loss
  loss_drop     mean loss of the last `window` steps below that of the first `window` by `min_loss_drop` (relative)
  heldout_drop  held-out loss after training below the one before by `min_heldout_drop` (relative)
  expert_grads  in every decoder layer every expert LoRA tensor (and, where the layout says which slice belongs to
                which expert, every expert) received a non-zero finite gradient during the run
  reload        the saved adapter, loaded onto the saved base model, reproduces the trained model's logits
Router load per expert (tokens routed, its entropy and max/mean) is recorded per layer: the expert utilization
view. It is information, not a gate: a random-init router has no right answer.

Outputs in validate/<arm>/: metrics.csv (tidy rows, each also a MOEBENCH_ROW line of the log), loss.csv
(step,loss), gates.json (the gate table), router.csv (tokens per layer and expert), adapter/ (the trained
adapter). An arm that cannot run here gives `skipped` rows; one that crashes gives `failed` rows.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from . import arms as arm_registry
from . import config as cfgmod
from . import harness, routing
# The fine-tune's plumbing (sft) and the adapter round trip (adapters) are shared modules. Their names stay
# importable as validate.X, and run() calls them through this module, so a test can patch one here.
from .adapters import (adapter_max_diff, adapter_state, logits_of, next_token_loss, probe,  # noqa: F401
                       reload_model, save_adapter, saved_adapter)
from .io import atomic_write, logger, read_json, write_json
from .harness import Ctx, read_texts
from .gates import (Gate, _finite, gate_expert_grads, gate_finite, gate_heldout,  # noqa: F401
                    gate_loss_drop, gate_reload, judge, window_means)
from .metrics import log_row, write_rows
from .sft import (Recorder, expert_lora_tensors, packed, same_data, sft_config, trainer_callback,  # noqa: F401
                  trainer_class)

DEFAULTS = cfgmod.defaults("validate")  # the schema is the one home of defaults


# ---- settings --------------------------------------------------------------------------------------------
def run_settings(vcfg: dict | None, plan: dict, cuda: bool, arm: str = "") -> dict:
    """The validate config with defaults, resolved for this host and arm: CPU takes cpu_steps / cpu_seq_len and
    torch AdamW (bitsandbytes' 8-bit optimizer needs CUDA); a GPU tier takes `arm_steps[arm]` where set, else
    steps; sequence length defaults to the tier plan's."""
    s = {**DEFAULTS, **(vcfg or {})}
    steps = (s.get("arm_steps") or {}).get(arm, s["steps"])
    seq = s["seq_len"] or plan["seq_len"]
    if not cuda:
        seq = min(seq, s["cpu_seq_len"] or seq)
    return {**s, "steps": steps if cuda else s["cpu_steps"], "seq_len": int(seq), "batch": int(plan["batch"]),
            "optim": s["optim"] if cuda else "adamw_torch", "bf16": cuda, "use_cpu": not cuda}


# ---- the run ------------------------------------------------------------------------------------------------
def free_memory():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fine_tune(ctx: Ctx, trainer, rec: Recorder, out_dir: Path, log) -> dict:
    """Held-out loss, training, held-out loss again; the per-step loss goes to loss.csv and into rows."""
    before = trainer.evaluate()["eval_loss"]
    log.info("held-out loss before training: %s", before)
    rec.counting = True
    t0 = time.perf_counter()
    trainer.train()
    ctx.add("train_s", time.perf_counter() - t0, "s")
    rec.counting = False
    after = trainer.evaluate()["eval_loss"]
    log.info("held-out loss after training: %s", after)
    hist = [h for h in trainer.state.log_history if "loss" in h and "step" in h]
    losses = [float(h["loss"]) for h in hist]
    gnorms = [float(h["grad_norm"]) for h in hist if h.get("grad_norm") is not None]
    log.info("loss per step: %s", [round(v, 5) for v in losses])
    log.info("grad norm per step: %s", [round(v, 5) for v in gnorms])
    atomic_write(out_dir / "loss.csv", "step,loss\n" + "".join(f"{h['step']},{float(h['loss'])!r}\n" for h in hist))
    for h in hist:
        ctx.add(f"loss_step_{int(h['step']):04d}", float(h["loss"]), "nats")
    ctx.add("optimizer_steps", rec.steps, "count")
    ctx.add("heldout_loss_before", before, "nats")
    ctx.add("heldout_loss_after", after, "nats")
    ctx.add("grad_norm_max", max(gnorms) if gnorms and all(map(_finite, gnorms)) else float("nan"), "norm")
    ctx.add("nonfinite_grad_steps", rec.nonfinite_steps, "count")
    return {"losses": losses, "gnorms": gnorms, "before": before, "after": after}


def expert_rows(ctx: Ctx, layers: dict[int, dict]) -> None:
    for l, d in sorted(layers.items()):
        ctx.add(f"expert_lora_tensors_L{l:02d}", d["tensors"], "count")
        ctx.add(f"expert_lora_tensors_with_grad_L{l:02d}", d["tensors_with_grad"], "count")
        if "experts" in d:
            ctx.add(f"experts_with_grad_L{l:02d}", d["experts_with_grad"], "count")


def trained_reference(ctx: Ctx, trainer, model, x, saved: dict) -> dict:
    """The trained model's side of the reload check, through its plain forward: the trainer's accelerator
    wrapped `forward` in bf16 autocast for mixed precision, which a reloaded model does not have; left in place,
    the comparison measures autocast against plain bf16 instead of the adapter (it did, on the H100)."""
    as_trained = logits_of(model, x)
    model = trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    logits, picks = probe(model, x)
    ctx.add("reload_trained_autocast_max_abs_diff", float((as_trained - logits).abs().max()), "logit")
    # the same model run twice: the floor under which a reload difference is kernel noise, not a lost adapter
    ctx.add("reload_trained_repeat_max_abs_diff", float((logits_of(model, x) - logits).abs().max()), "logit")
    return {"logits": logits, "picks": picks, "adapter_diff": adapter_max_diff(adapter_state(model), saved)}


def reload_gate(ctx: Ctx, arm, ref: dict, x, model_dir: str, adapter: Path, saved: dict, lora, plan: dict,
                rtol: float, log) -> tuple[Gate, str]:
    """Reload the saved adapter (the trained model is gone by now: two full models may not fit) and compare."""
    got = reload_model(arm, model_dir, adapter, saved, lora, plan, x, log)
    trained = ref["logits"]
    diff = float((trained - got["logits"]).abs().max())
    fresh_diff = float((trained - got["fresh"]).abs().max())
    scale = float(trained.abs().max())
    ctx.add("reload_logits_max_abs_diff", diff, "logit")
    ctx.add("reload_logits_max_abs", scale, "logit")
    ctx.add("reload_fresh_logits_max_abs_diff", fresh_diff, "logit")
    ctx.add("reload_argmax_agreement", float((trained.argmax(-1) == got["logits"].argmax(-1)).float().mean()),
            "fraction")
    ctx.add("reload_loss_trained", next_token_loss(trained, x), "nats")
    ctx.add("reload_loss_reloaded", next_token_loss(got["logits"], x), "nats")
    flips = routing.RouterLoad.flips(ref["picks"], got["picks"])
    if flips is not None:  # explains a logit difference: a token sent to other experts
        ctx.add("reload_routing_flips", flips, "fraction")
    worst = max(ref["adapter_diff"], got["adapter_diff"])
    ctx.add("reload_adapter_max_abs_diff", worst, "value")
    return gate_reload(diff, scale, rtol, fresh_diff, worst), got["how"]


def run(ctx: Ctx, arm, cfg: dict, tier: dict, model_dir: str, train_path: str, heldout_path: str, out_dir: Path,
        log, progress=None) -> dict:
    """Load, fine-tune, gate, save, reload. Returns the gates.json document (rows go to ctx)."""
    arm.preimport()  # before transformers: Unsloth patches it at import
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    from . import measure

    cuda = torch.cuda.is_available()
    s = run_settings(cfg.get("validate"), tier["plan"], cuda, arm.name)
    log.info("settings: %s", json.dumps(s, sort_keys=True))
    lora = harness.lora_spec(cfg)
    torch.manual_seed(cfg["seed"])
    t0 = time.perf_counter()
    model = arm.load(model_dir, lora, tier["plan"]).model
    ctx.add("load_s", time.perf_counter() - t0, "s")
    ctx.add("trainable_params", sum(p.numel() for p in model.parameters() if p.requires_grad), "params")
    tok = AutoTokenizer.from_pretrained(model_dir)
    mc = model.config
    shape = routing.moe_shape(mc)
    rec = Recorder(model, shape["experts"], shape["top_k"])
    ctx.add("expert_lora_tensors", len(rec.experts), "count")
    ctx.add("expert_lora_params", sum(t["param"].numel() for t in rec.experts), "params")
    scratch = tempfile.TemporaryDirectory(prefix="moebench-sft-")  # the trainer's output_dir; it saves nothing
    train = packed(tok, read_texts(train_path), s["seq_len"])
    heldout_texts = read_texts(heldout_path)
    heldout = packed(tok, heldout_texts, s["seq_len"])
    trl_loss = cuda and importlib.util.find_spec("triton") is not None
    ctx.add("loss_path", "trl fused LM head (triton)" if trl_loss else "model's own causal-LM loss (no triton)", "")
    trainer = trainer_class(trl_loss)(
        model=model, args=sft_config(s, scratch.name, cfg["seed"]), processing_class=tok,
        train_dataset=Dataset.from_list(train), eval_dataset=Dataset.from_list(heldout),
        callbacks=[trainer_callback(rec)])
    same_data(trainer, train, heldout)
    ctx.add("packed_train_sequences", len(trainer.train_dataset), "count")
    ctx.add("train_tokens_per_epoch", sum(len(b["input_ids"]) for b in train), "tokens")
    if progress:
        progress.enter(f"fine-tuning ({s['steps']} optimizer steps)")
    ft = fine_tune(ctx, trainer, rec, out_dir, log)
    for k, v in measure.memory_peak(cuda).items():
        ctx.add(k, v, "GB")
    layers = rec.layer_table()
    expert_rows(ctx, layers)
    router = rec.router_counts()
    rec.remove()
    router_rows(ctx, router, out_dir / "router.csv")
    log.info("router tokens per expert: %s", json.dumps(router))
    gates = [gate_finite(ft["losses"], ft["gnorms"], [ft["before"], ft["after"]], rec.nonfinite_steps),
             gate_loss_drop(ft["losses"], s["window"], s["min_loss_drop"]),
             gate_heldout(ft["before"], ft["after"], s["min_heldout_drop"]),
             gate_expert_grads(layers if lora.experts else {}, int(mc.num_hidden_layers), s["min_expert_fraction"])]
    if not lora.experts:
        gates[-1].detail = "lora.experts is false: no expert LoRA to validate"

    adapter = out_dir / "adapter"
    kind = save_adapter(model, adapter)
    saved = saved_adapter(adapter)  # read back once: the reference for both sides of the round trip
    x = torch.tensor([tok(heldout_texts[0])["input_ids"][: s["reload_tokens"]]],
                     device=next(model.parameters()).device)
    if progress:
        progress.enter("reload check")
    ref = trained_reference(ctx, trainer, model, x, saved)
    del trainer, model, rec
    scratch.cleanup()
    free_memory()
    g, how = reload_gate(ctx, arm, ref, x, model_dir, adapter, saved, lora, tier["plan"], s["reload_rtol"], log)
    del saved
    gates.append(g)
    free_memory()
    for g in gates:
        log.info("gate %s: %s (value %s, threshold %s) %s", g.name, "PASS" if g.passed else "FAIL", g.value,
                 g.threshold, g.detail)
        ctx.add(f"gate_{g.name}", 1.0 if g.passed else 0.0, "pass")
        if g.value is not None:
            ctx.add(f"gate_{g.name}_value", g.value, g.unit)
    passed = judge(gates)
    ctx.add("gates_passed", 1.0 if passed else 0.0, "pass")
    return {"status": "measured", "reason": "", "passed": passed, "gates": [asdict(g) for g in gates],
            "adapter": {"format": kind, "reload": how}, "settings": s,
            "router": {str(l): {"tokens_per_expert": c, **routing.summary(c)} for l, c in router.items()}}


def router_rows(ctx: Ctx, router: dict[int, list[int]], csv_path: Path) -> None:
    lines = ["layer,expert,tokens,share"]
    if not router:
        ctx.add("router_entropy_norm", status="unavailable",
                reason="no router module (`mlp.router` / `mlp.gate`) reported top-k indices in this arm's forward (its MoE path does "
                       "not call the transformers router)")
    for l, c in router.items():
        r = routing.summary(c)
        ctx.add(f"router_tokens_L{l:02d}", r["tokens"], "tokens")
        ctx.add(f"router_entropy_norm_L{l:02d}", r["entropy_norm"], "fraction of log E")
        ctx.add(f"router_max_over_mean_L{l:02d}", r["max_over_mean"], "ratio")
        ctx.add(f"router_unused_experts_L{l:02d}", r["unused"], "count")
        tot = sum(c) or 1
        lines += [f"{l},{e},{n},{n / tot!r}" for e, n in enumerate(c)]
    atomic_write(csv_path, "\n".join(lines) + "\n")


def placeholders(out_dir: Path, why: str) -> None:
    """Outputs the rule declares exist for an arm that did not train, saying why (never a fake curve)."""
    adapter = out_dir / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    if not any(adapter.iterdir()):  # an adapter saved before a later failure stays as it is
        atomic_write(adapter / "NO_ADAPTER.txt", why + "\n")
    if not (out_dir / "loss.csv").exists():
        atomic_write(out_dir / "loss.csv", "step,loss\n")
    if not (out_dir / "router.csv").exists():
        atomic_write(out_dir / "router.csv", "layer,expert,tokens,share\n")


def validate_arm(cfg: dict, tier: dict, arm_name: str, model_dir: str, train: str, heldout: str, out_dir,
                 log_path: str) -> dict:
    """One arm, start to finish; writes every output the rule declares and returns the gates.json document."""
    log = logger("validate", log_path)
    started = datetime.now(timezone.utc).isoformat()
    arm = arm_registry.get(arm_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(cfg["run"], tier["tier"], cfg["model"]["name"], arm.name, arm.precision, None, log_path,
              stage="validate")
    skip = harness.unavailable(arm, tier["plan"], tier.get("gpu") is not None, model_dir)
    timeout = int({**DEFAULTS, **(cfg.get("validate") or {})}["timeout_s"])
    # a run that does not finish leaves a `gates_passed` row saying why there is no verdict (rows before it stay)
    outcome = harness.guarded(ctx, log, lambda progress: run(ctx, arm, cfg, tier, model_dir, train, heldout, out,
                                                              log, progress),
                              timeout, skip=skip, metric="gates_passed", setting="validate.timeout_s")
    doc = outcome.result if outcome.status == "measured" else {"status": outcome.status, "reason": outcome.reason}
    if doc["status"] != "measured":
        doc.update(passed=None, gates=[])
        placeholders(out, f"{arm.name} {doc['status']}: {doc['reason']}")
    for r in ctx.rows:
        log_row(log, r)
    doc = {"run": cfg["run"], "tier": tier["tier"], "arm": arm.name, "precision": arm.precision, "log": log_path,
           "packages": harness.versions(), "environment": harness.environment(started, tier), **doc}
    write_json(out / "gates.json", doc)
    write_rows(out / "metrics.csv", ctx.rows)  # last: its existence marks the arm validated
    return doc


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--tier", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--train", required=True)
    ap.add_argument("--heldout", required=True)
    ap.add_argument("--arm", required=True)
    ap.add_argument("--out-dir", required=True, help="validate/<arm>")
    ap.add_argument("--log", required=True)
    a = ap.parse_args(argv)
    validate_arm(cfgmod.load(a.config), read_json(a.tier), a.arm, a.model, a.train, a.heldout, a.out_dir, a.log)


if __name__ == "__main__":
    main()
