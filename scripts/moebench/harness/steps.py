"""The steps every measuring stage shares: the LoRA spec, packed token blocks, one training step, and loading
through the arm with what really got loaded recorded."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .. import arms as arm_registry
from .. import inspect


# ---- the common steps: LoRA spec, load, inputs, one training step -----------------------------------------
def lora_spec(cfg: dict) -> arm_registry.LoRASpec:
    lo = cfg["lora"]
    return arm_registry.LoRASpec(lo["r"], lo["alpha"], lo.get("dropout", 0.0), tuple(lo.get("attention", ())),
                                 lo.get("experts", True))


def read_texts(path: str) -> list[str]:
    """The rendered conversations of a train/held-out .jsonl (one {"text": ...} per line)."""
    return [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """The conversations as one token stream, each closed by EOS: what bench and validate both pack."""
    eos = tokenizer.eos_token_id
    return [i for t in texts for i in tokenizer(t)["input_ids"] + [eos]]


def batches(data_path: str, tokenizer, seq_len: int, batch: int, count: int, seed: int):
    """Pack the rendered conversations into one token stream and cut it into [batch, seq_len] blocks: every
    position is a real token (no padding, never zeros). Cycles through the stream when it is short."""
    import torch

    stream = token_stream(tokenizer, read_texts(data_path))
    need = seq_len * batch
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(stream, dtype=torch.long)
    while ids.numel() < need + 1:
        ids = torch.cat([ids, ids])
    for _ in range(count):
        start = int(torch.randint(0, ids.numel() - need, (1,), generator=g))
        yield ids[start:start + need].view(batch, seq_len)


def make_inputs(model_dir: str, data_path: str, plan: dict, count: int, seed: int, cuda: bool) -> list:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [x.to("cuda" if cuda else "cpu") for x in batches(data_path, tok, plan["seq_len"], plan["batch"], count, seed)]


def train_step(model, opt, x):
    opt.zero_grad(set_to_none=True)  # at the start, so the last step's gradients stay for the expert-LoRA check
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    opt.step()
    return out.loss.detach()


def freeze(opt) -> None:
    """Learning rate 0: AdamW still computes every update (same kernels, same work), but no weight moves, so
    the routing, and with it the step time, cannot drift. Random-init training moves it fast: on full-size
    GPT-OSS-20B, calibrated routers' max/mean load rose from 2.6 at the first step to 5-7 within four warm-up
    steps (results/h200-gptoss20b-tier)."""
    for group in opt.param_groups:
        group["lr"] = 0.0


def load_model(ctx, arm, cfg: dict, plan: dict, model_dir: str, log, cuda: bool):
    """Load through the arm (timed), then record memory after load and what really got loaded."""
    import torch

    from .. import measure

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loaded = arm.load(model_dir, lora_spec(cfg), plan)
    if cuda:
        torch.cuda.synchronize()
    ctx.add("load_s", time.perf_counter() - t0, "s")
    model = loaded.model
    for k, v in measure.memory_now(cuda).items():
        ctx.add(f"{k.removesuffix('_gb')}_after_load_gb", v, "GB")
    census = inspect.census(model)
    log.info("loaded: %s", json.dumps(loaded.info, default=str))
    # Unsloth's GPT-OSS view (interleaved gate/up) applies to GPT-OSS only; other families run what it selected
    gpt_oss = getattr(getattr(loaded.model, "config", None), "model_type", "") == "gpt_oss"
    backend = (loaded.info.get("moe_backend_gpt_oss") if gpt_oss else loaded.info.get("moe_backend_selected")) or \
        loaded.info.get("moe_backend") or loaded.info.get("experts_implementation")
    if backend:  # what really ran, not what was asked for
        ctx.add("moe_backend", str(backend), "")
    log.info("dtype census after load: %s", json.dumps(census))
    ctx.conditions.update(inspect.conditions(model, census, plan))
    ctx.add("trainable_params", sum(p.numel() for p in model.parameters() if p.requires_grad), "params")
    for cat in ("expert", "attention"):
        ctx.add(f"{cat}_weights_gb", inspect.weights_gb(census, cat), "GB")
        ctx.add(f"{cat}_weights_4bit_fraction", inspect.four_bit_fraction(census, cat), "fraction")
    return model
