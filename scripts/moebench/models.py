"""Model factory: an architecture-faithful random-init MoE from its published config, or a real checkpoint.

Built once per run and saved; every arm loads it from disk, as users load real checkpoints. Random weights
change no throughput, memory or energy figure (same shapes, same kernels), but they cannot show quality or the
skewed expert load of a trained router.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import router_calibration, routing
from .corpus import conversations, corpus_text, split
from .io import logger, sha256_file, write_json
from .shapes import model_config

SPECIAL = ["<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>",
           "<|constrain|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = Path(__file__).resolve().parents[2] / "config" / "templates" / "harmony.jinja"


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE trained here on the synthetic corpus (no hub), with Harmony's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|return|>", pad_token="<|pad|>")
    fast.chat_template = TEMPLATE.read_text()
    return fast


def random_init(cfg, seed: int, device: str = "cpu", dtype: str = "bfloat16"):
    import torch
    import transformers

    torch.manual_seed(seed)
    cls = getattr(transformers, cfg.architectures[0])
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):  # init directly on the GPU for full size: 21B params init in seconds
            model = cls(cfg)
    finally:
        torch.set_default_dtype(old)
    return model


def fingerprint(model_dir: str | Path, hash_weights_below_gb: float = 2.0) -> dict:
    """Hashes that identify the saved model: config and tokenizer always, weights when small enough."""
    d = Path(model_dir)
    files = sorted(p for p in d.iterdir() if p.is_file())
    weights = [p for p in files if p.suffix == ".safetensors"]
    total = sum(p.stat().st_size for p in weights)
    out = {"config_sha256": sha256_file(d / "config.json"), "weights_bytes": total,
           "files": {p.name: p.stat().st_size for p in files}}
    if (d / "tokenizer.json").exists():
        out["tokenizer_sha256"] = sha256_file(d / "tokenizer.json")
    if total < hash_weights_below_gb * 2**30:
        out["weights_sha256"] = {p.name: sha256_file(p) for p in weights}
    return out


def routing_census(model, tok, corpus: list[str], device: str, tokens: int = 1024) -> dict:
    """The router load the saved model really has: one no-grad forward over the start of the corpus."""
    import torch

    ids = tok("\n".join(corpus[:64]), return_tensors="pt").input_ids[:, :tokens].to(device)
    if ids.shape[1] == 0:
        return {"tokens": 0, "reason": "no corpus text to route"}
    load = routing.RouterLoad.of(model)
    load.counting = True
    with torch.no_grad():
        model(input_ids=ids)
    load.remove()
    return {"tokens": int(ids.shape[1]), **load.overall()}


def _token_blocks(tok, convs: list[dict], seq_len: int, max_tokens: int):
    """Conversations rendered with the chat template (as the data stage renders them), concatenated and cut into
    (n, seq_len) blocks, the bench's shape: at most max_tokens tokens, blocks spread evenly over all the
    conversations (a calibration on the first few only would fit their topics)."""
    import torch

    ids = [i for conv in convs for i in tok(tok.apply_chat_template(conv["messages"], tokenize=False))["input_ids"]]
    seq = min(seq_len, len(ids))
    have = len(ids) // seq if seq else 0
    if have == 0:
        raise ValueError("router calibration: no conversation tokens to calibrate on (raise data.conversations)")
    n = min(have, max(1, max_tokens // seq))
    starts = [(k * have // n) * seq for k in range(n)]
    return torch.tensor([ids[s:s + seq] for s in starts])


def calibrate_routers(model, tok, router_load, convs: tuple[list, list], seq_len: int, device: str, seed: int,
                      log) -> dict:
    """Calibrate a random-init model's routers to `router_load` on the training conversations; the load is
    measured on the held-out ones (router_calibration has the method)."""
    cal = _token_blocks(tok, convs[0], seq_len, router_calibration.MAX_TOKENS).to(device)
    held = _token_blocks(tok, convs[1], seq_len, router_calibration.MAX_TOKENS).to(device)
    return router_calibration.calibrate(model, cal, held, router_load, seed, log)


def build(spec: dict, scale: str, source: str, out_dir: str, seed: int, corpus: list[str], log,
          device: str = "cpu", num_hidden_layers: int | None = None, routing_skew: float = 0.0,
          router_load: str | float = "raw", calib_convs: tuple[list, list] | None = None, seq_len: int = 256,
          routers_out: str | None = None) -> dict:
    """Build (random-init) or load (checkpoint) the model, set its router load, save it. `router_load` is
    router_calibration.parse's value; calib_convs (train, held-out conversations) are needed unless it is raw.
    routers_out: a safetensors file beside the model with the raw and the saved router tensors."""
    import torch

    out = Path(out_dir)
    t0 = time.perf_counter()
    if routing_skew > 0 and router_load not in ("raw", "balanced"):
        raise ValueError(f"model.router_load={router_load} sets the load itself: use routing_skew 0 with a "
                         "numeric router_load, or router_load raw/balanced under a skew")
    if source == "random-init":
        cfg = model_config(spec, scale, num_hidden_layers)
        cfg.architectures = [spec["model_class"]]
        tok = train_tokenizer(corpus, vocab_size=min(cfg.vocab_size, 8192))
        cfg.eos_token_id, cfg.pad_token_id = tok.eos_token_id, tok.pad_token_id
        model = random_init(cfg, seed, device)
        how = f"random-init {spec['model_class']} ({scale}) seed {seed}"
        log.info("built %s in %.1f s", how, time.perf_counter() - t0)
        raw = router_calibration.router_state(model)
        calib = {"router_load": "raw", "how": "random-init routers as initialised"}
        if router_load != "raw":
            if calib_convs is None:
                raise ValueError(f"model.router_load={router_load!r} needs the training conversations to "
                                 "calibrate on (calib_convs)")
            calib = calibrate_routers(model, tok, router_load, calib_convs, seq_len, device, seed, log)
        skew = routing.apply_skew(model, routing_skew, seed) | {"calibration": calib}
    else:  # a real checkpoint: local directory or hub id
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16, device_map=device)
        except OSError as exc:
            raise SystemExit(f"model.source={source!r}: cannot load it with from_pretrained ({exc}). "
                             "Give a local directory with config.json and weights, a reachable hub id, "
                             "or 'random-init'.") from exc
        how = f"from_pretrained({source!r})"
        raw = router_calibration.router_state(model)
        log.info("routing: the checkpoint's trained routers, untouched (model.router_load and routing_skew "
                 "apply to random-init models only)")
        skew = {"routing_skew": None, "how": "the checkpoint's own router",
                "calibration": {"router_load": "trained", "how": "the checkpoint's own routers, untouched"}}
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %.3fB parameters, %.1f s so far", how, n_params / 1e9, time.perf_counter() - t0)
    skew["measured"] = routing_census(model, tok, corpus, device)
    log.info("routing: %s", json.dumps({k: v for k, v in skew.items() if k != "calibration"}))
    if routers_out:
        router_calibration.save_routers(routers_out, raw, router_calibration.router_state(model))
    tmp = out.with_name(out.name + ".partial")  # rename at the end: no half-saved model looks complete
    model.save_pretrained(tmp, max_shard_size="5GB")
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    log.info("saved to %s in %.1f s total", out, time.perf_counter() - t0)
    return {"how": how, "parameters": n_params, "scale": scale if source == "random-init" else "checkpoint",
            "routing": skew}


def main(argv=None):
    from . import config as cfgmod

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--tier", required=True, help="tier.json")
    ap.add_argument("--out", required=True, help="model directory")
    ap.add_argument("--sha", required=True, help="model.sha256 (JSON fingerprint)")
    ap.add_argument("--routers", help="safetensors file of the raw and the saved router tensors")
    ap.add_argument("--log")
    a = ap.parse_args(argv)
    log = logger("model", a.log)
    cfg = cfgmod.load(a.config)
    tier = json.loads(Path(a.tier).read_text())
    plan, m, d = tier["plan"], cfg["model"], cfg["data"]
    spec = cfgmod.load_yaml("models.yaml")[m["name"]]
    device = "cuda" if tier["gpu"] else "cpu"
    corpus = corpus_text(d["conversations"], d["seed"])
    convs = split(conversations(d["conversations"], d["seed"]), d.get("heldout_fraction", 0.1), d["seed"])
    load = router_calibration.parse(m.get("router_load", "auto"), on_gpu=bool(tier["gpu"]))
    info = build(spec, plan["model_scale"], m["source"], a.out, cfg["seed"], corpus, log, device,
                 plan.get("num_hidden_layers"), m.get("routing_skew", 0.0), load, convs, plan["seq_len"],
                 a.routers)
    write_json(a.sha, {**info, **fingerprint(a.out), "model": cfg["model"]})


if __name__ == "__main__":
    main()
