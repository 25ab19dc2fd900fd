"""Training validation: does each arm really learn? A real LoRA fine-tune per arm with TRL's SFTTrainer, judged
by quality gates, each recorded pass/fail with the value it rests on.

One arm per process, loaded through the arm's own path (`arm.load`), trained on the synthetic Harmony data with
packing, gradient accumulation, a cosine schedule with warm-up and 8-bit AdamW on a GPU (torch AdamW on CPU,
where bitsandbytes' optimizer cannot run). Gates (pure functions below, so a test can build a run that fails each):
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
import math
import re
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from . import arms as arm_registry
from . import config as cfgmod
from . import harness, routing
from .io import atomic_write, logger, read_json, write_json
from .harness import Ctx, read_texts, token_stream
from .gates import (Gate, _finite, gate_expert_grads, gate_finite, gate_heldout,  # noqa: F401
                    gate_loss_drop, gate_reload, judge, window_means)
from .metrics import log_row, write_rows

DEFAULTS = {"steps": 100, "cpu_steps": 12, "grad_accum": 4, "lr": 2e-4, "warmup_ratio": 0.1,
            "scheduler": "cosine", "optim": "adamw_8bit", "max_grad_norm": 1.0, "packing_strategy": "wrapped",
            "arms": None, "arm_steps": {}, "seq_len": None, "cpu_seq_len": 128, "window": 10, "min_loss_drop": 0.005, "min_heldout_drop": 0.0,
            "min_expert_fraction": 1.0, "reload_rtol": 0.01, "reload_tokens": 64, "timeout_s": 3600}


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


# ---- recording during training -----------------------------------------------------------------------------
def expert_lora_tensors(model) -> list[dict]:
    """Every expert LoRA tensor (trainable or not: a frozen one must count as getting no gradient) with its
    layer and, where the layout says so, which slice belongs to which expert:
    PEFT target_parameters on fused [E, in, out] tensors: lora_A is [r*E, in] (expert e = rows e*r..), lora_B
    is [out, r*E] (expert e = columns e, e+E, ...); Unsloth's per-expert Linears: `..._projs.<e>.`."""
    layout = {}
    for _, mod in model.named_modules():
        ne = getattr(mod, "num_experts", None)
        if isinstance(ne, int) and ne > 1 and hasattr(mod, "lora_A") and hasattr(mod, "parameter_name"):
            for ad in mod.lora_A:
                layout[id(mod.lora_A[ad].weight)] = ("A", ne)
                layout[id(mod.lora_B[ad].weight)] = ("B", ne)
    out = []
    for n, p in model.named_parameters():
        if "lora" not in n.lower() or "expert" not in n:
            continue
        m = re.search(r"layers\.(\d+)\.", n)
        e = re.search(r"_projs\.(\d+)\.", n)
        kind, ne = layout.get(id(p), (None, None))
        out.append({"name": n, "param": p, "layer": int(m.group(1)) if m else -1, "kind": kind, "experts": ne,
                    "expert": int(e.group(1)) if e else None})
    return out


class Recorder:
    """Gradient facts at every optimizer step (after accumulation and clipping, before the update): non-finite
    trainable gradients, and which expert LoRA tensors / expert slices ever got a non-zero finite gradient.
    Router load: tokens per expert from each router's top-k indices while `counting` is on."""

    def __init__(self, model, num_experts: int, top_k: int):
        import torch

        self.torch = torch
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.experts = expert_lora_tensors(model)
        self.ever = [False] * len(self.experts)
        self.expert_hits: dict[int, "torch.Tensor"] = {}  # per tensor with a per-expert layout
        self.nonfinite_steps = 0
        self.steps = 0
        self.router = routing.RouterLoad(model, num_experts, top_k)

    @property
    def counting(self) -> bool:
        return self.router.counting

    @counting.setter
    def counting(self, on: bool) -> None:
        self.router.counting = on

    def router_counts(self) -> dict[int, list[int]]:
        return self.router.counts()

    def remove(self):
        self.router.remove()

    # -- gradients
    def on_step(self):
        torch = self.torch
        self.steps += 1
        grads = [p.grad for p in self.trainable if p.grad is not None]
        if grads:
            norms = torch.stack([g.detach().float().norm() for g in grads])
            if not bool(torch.isfinite(norms).all()):
                self.nonfinite_steps += 1
        for i, t in enumerate(self.experts):
            g = t["param"].grad
            if g is None:
                continue
            g = g.detach().float()
            ok = torch.isfinite(g).all()
            if bool(ok & (g.abs().sum() > 0)):
                self.ever[i] = True
            if t["kind"] is not None:
                ne = t["experts"]
                per = g.reshape(ne, -1).abs().sum(1) if t["kind"] == "A" else \
                    g.reshape(g.shape[0], -1, ne).abs().sum((0, 1))
                hit = (per > 0) & ok
                self.expert_hits[i] = self.expert_hits[i] | hit if i in self.expert_hits else hit

    def layer_table(self) -> dict[int, dict]:
        """Per layer: expert LoRA tensors, those with a gradient, and (where known) experts whose every slice
        got one."""
        out: dict[int, dict] = {}
        for i, t in enumerate(self.experts):
            d = out.setdefault(t["layer"], {"tensors": 0, "tensors_with_grad": 0, "_experts": {}})
            d["tensors"] += 1
            d["tensors_with_grad"] += int(self.ever[i])
            if t["kind"] is not None:
                hits = self.expert_hits.get(i)
                for e in range(t["experts"]):
                    ok = bool(hits[e]) if hits is not None else False
                    d["_experts"][e] = d["_experts"].get(e, True) and ok
            elif t["expert"] is not None:
                d["_experts"][t["expert"]] = d["_experts"].get(t["expert"], True) and self.ever[i]
        for d in out.values():
            ex = d.pop("_experts")
            if ex:
                d["experts"], d["experts_with_grad"] = len(ex), sum(ex.values())
        return out


def trainer_callback(rec: Recorder):
    from transformers import TrainerCallback

    class _CB(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            rec.on_step()

    return _CB()


# ---- the run ------------------------------------------------------------------------------------------------
def packed(tokenizer, texts: list[str], seq_len: int) -> list[dict]:
    """TRL's "wrapped" packing (`validate.packing_strategy`, the one strategy), done here so that every stack
    trains on the same blocks: the token stream cut into seq_len blocks (the last one may be shorter). Left to
    the trainer, Unsloth's SFTTrainer ignored packing=True for gpt_oss on the H100 and trained on 180 single
    conversations where TRL made 99 blocks."""
    stream = token_stream(tokenizer, texts)
    return [{"input_ids": stream[i:i + seq_len]} for i in range(0, len(stream), seq_len)]


def sft_config(s: dict, out_dir: str, seed: int):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=out_dir, max_steps=s["steps"], per_device_train_batch_size=s["batch"],
        per_device_eval_batch_size=s["batch"], gradient_accumulation_steps=s["grad_accum"],
        learning_rate=s["lr"], lr_scheduler_type=s["scheduler"], warmup_steps=s["warmup_ratio"],
        optim=s["optim"], max_grad_norm=s["max_grad_norm"], bf16=s["bf16"],
        # the datasets arrive packed (`packed`): no packing or padding-free by the stack
        packing=False, padding_free=False, max_length=s["seq_len"],
        logging_steps=1, logging_nan_inf_filter=False,  # the filter would hide a NaN loss from the gate
        gradient_checkpointing=False,  # the arm has set up its own stack's checkpointing (tier plan)
        eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, seed=seed, data_seed=seed,
        dataloader_num_workers=0, use_cpu=s["use_cpu"])


def trainer_class(trl_loss: bool):
    """TRL 1.15's SFTTrainer computes its loss with a Triton kernel (fused LM head, GPU only). Without Triton
    (the CPU torch wheel) the same packed batches go through the model's own causal-LM loss instead."""
    from trl import SFTTrainer

    if trl_loss:
        return SFTTrainer
    from transformers import Trainer

    class PlainLossSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return PlainLossSFTTrainer


def logits_of(model, x):
    import torch

    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits.float().cpu()


def probe(model, x) -> tuple:
    """(logits, each router's sorted top-k expert set per token) of one forward in eval mode."""
    load = routing.RouterLoad.of(model)
    load.keeping = True
    try:
        return logits_of(model, x), load.picks
    finally:
        load.remove()


def next_token_loss(logits, x) -> float:
    import torch

    return float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:].cpu()))


def save_adapter(model, out: Path) -> str:
    """PEFT models save their adapter (save_pretrained); a model with its own LoRA modules (e4b) saves its
    trainable tensors."""
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config") and hasattr(model, "save_pretrained"):
        model.save_pretrained(str(out))
        return "peft"
    from safetensors.torch import save_file

    save_file({n: p.detach().contiguous().cpu() for n, p in adapter_state(model).items()},
              str(out / "trainable.safetensors"))
    return "trainable-state"


def adapter_state(model) -> dict:
    """The adapter tensors under the names they are saved with (PEFT's own mapping for PEFT models)."""
    if hasattr(model, "peft_config"):
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def saved_adapter(adapter: Path) -> dict:
    if (adapter / "adapter_config.json").exists():
        from peft.utils import load_peft_weights

        return load_peft_weights(str(adapter), device="cpu")
    from safetensors.torch import load_file

    return load_file(str(adapter / "trainable.safetensors"))


def adapter_max_diff(live: dict, saved: dict) -> float:
    """Max |live - saved| over every saved tensor (values compared in float32, dtypes must match too); inf when a
    tensor is missing on either side or differs in shape or dtype."""
    if set(live) != set(saved):
        return math.inf
    worst = 0.0
    for k, t in saved.items():
        v = live[k].detach()
        if v.shape != t.shape or v.dtype != t.dtype:
            return math.inf
        worst = max(worst, float((v.float() - t.to(v.device).float()).abs().max()) if t.numel() else 0.0)
    return worst


def reload_model(arm, model_dir: str, adapter: Path, saved: dict, lora, plan: dict, x, log) -> dict:
    """Load the saved adapter as a user would and probe it: {"fresh": logits before the adapter is loaded,
    "logits", "picks", "adapter_diff": reloaded adapter vs the saved file, "how"}. hf arms:
    PeftModel.from_pretrained on the saved base model; other PEFT arms: the arm loads the base its own way, then
    PEFT loads the saved weights into it; others: the arm loads, then its trainable tensors are loaded."""
    import torch

    cuda = torch.cuda.is_available()
    if (adapter / "adapter_config.json").exists() and arm.stack == "hf":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from .arms.hf import use_grouped_mm

        kw = {"dtype": torch.bfloat16, "device_map": "cuda" if cuda else "cpu"}
        q = arm.quantization() if hasattr(arm, "quantization") else None
        if q is not None:
            kw["quantization_config"] = q
        base = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
        use_grouped_mm(base, plan)  # as the arm trained it
        fresh = logits_of(base, x)
        model = PeftModel.from_pretrained(base, str(adapter))
        how = "PeftModel.from_pretrained"
    else:
        model = arm.load(model_dir, lora, plan).model
        fresh = logits_of(model, x)
        if (adapter / "adapter_config.json").exists():
            from peft.utils import set_peft_model_state_dict

            res = set_peft_model_state_dict(model, saved)
            if res.unexpected_keys:
                raise RuntimeError(f"adapter keys the reloaded model does not have: {res.unexpected_keys[:5]}")
            how = f"{arm.name} load + set_peft_model_state_dict ({len(saved)} tensors)"
        else:
            res = model.load_state_dict(saved, strict=False)
            if res.unexpected_keys:
                raise RuntimeError(f"saved tensors the reloaded model does not have: {res.unexpected_keys[:5]}")
            how = f"{arm.name} load + load_state_dict ({len(saved)} trainable tensors)"
    log.info("reloaded the adapter: %s", how)
    logits, picks = probe(model, x)
    out = {"fresh": fresh, "logits": logits, "picks": picks, "how": how,
           "adapter_diff": adapter_max_diff(adapter_state(model), saved)}
    del model
    return out


def free_memory():
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def same_data(trainer, train: list[dict], heldout: list[dict]) -> None:
    """Fail when the stack's trainer re-processed the packed blocks (then arms would not train on the same
    tokens)."""
    for name, mine, theirs in (("train", train, trainer.train_dataset), ("held-out", heldout, trainer.eval_dataset)):
        if len(theirs) != len(mine) or list(theirs[0]["input_ids"]) != mine[0]["input_ids"]:
            raise RuntimeError(f"{type(trainer).__name__} changed the packed {name} data ({len(mine)} blocks of "
                               f"{len(mine[0]['input_ids'])} tokens in, {len(theirs)} rows out): the arms would not "
                               f"train on the same tokens")


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
