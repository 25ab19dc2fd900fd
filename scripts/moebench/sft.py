"""The fine-tune's plumbing, the same for every stack: which expert LoRA tensors exist and which got a gradient
(`Recorder`, called at every optimizer step), the packed token blocks every arm trains on, and TRL's SFTTrainer
with its config. Shared so the validate stage holds only the run and its gates.
"""
from __future__ import annotations

import re

from . import routing
from .harness import token_stream


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


# ---- the trainer and its data -------------------------------------------------------------------------------
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


def same_data(trainer, train: list[dict], heldout: list[dict]) -> None:
    """Fail when the stack's trainer re-processed the packed blocks (then arms would not train on the same
    tokens)."""
    for name, mine, theirs in (("train", train, trainer.train_dataset), ("held-out", heldout, trainer.eval_dataset)):
        if len(theirs) != len(mine) or list(theirs[0]["input_ids"]) != mine[0]["input_ids"]:
            raise RuntimeError(f"{type(trainer).__name__} changed the packed {name} data ({len(mine)} blocks of "
                               f"{len(mine[0]['input_ids'])} tokens in, {len(theirs)} rows out): the arms would not "
                               f"train on the same tokens")
