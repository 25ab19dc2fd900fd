#!/usr/bin/env python3
"""Developer probe (not part of the workflow): what does each GPU stack really do on a small GPT-OSS?

Builds a 2-layer GPT-OSS at full width (hidden 2880, 32 experts, top-4) with moebench.models.build, saves it
in two layouts (transformers bf16; released-style MXFP4 experts; --modulelist adds Unsloth's per-expert bf16), then
runs each arm variant in its own subprocess: load, dtype census, LoRA coverage, a few timed training steps,
gradient check on the expert adapters. Every exception is kept with its traceback. Output: one JSON with a
record per variant, and a short table last. Step times are leads for the developer, never results.

    python devtools/gpu_probe.py --out $OUT [--layers 2] [--budget-s 480] [--only a,b]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("PROBE_WORK", "/tmp/probe"))
FP4 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# ------------------------------------------------------------------ MXFP4 writer (released gpt-oss layout)
def to_mxfp4(w):
    """[E, K, rows] input-major stack (as transformers stores it) -> (blocks [E, rows, K/32, 16] u8,
    scales [E, rows, K/32] u8): the layout e4b's and transformers' dequantizers read."""
    import torch

    wt = w.transpose(1, 2).float()  # [E, rows, K]
    E, rows, K = wt.shape
    g = wt.reshape(E, rows, K // 32, 32)
    amax = g.abs().amax(-1, keepdim=True).clamp_min(2.0 ** -126)
    e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    q = g / torch.exp2(e)
    grid = torch.tensor(FP4, device=w.device)
    idx = (q.abs().unsqueeze(-1) - grid).abs().argmin(-1).to(torch.uint8)
    idx = idx | ((q < 0).to(torch.uint8) << 3)
    blocks = (idx[..., 0::2] | (idx[..., 1::2] << 4)).contiguous()
    scales = (e.squeeze(-1) + 127).to(torch.uint8).contiguous()
    return blocks, scales


# ------------------------------------------------------------------ children
def child_build(a):
    import logging

    import torch
    from safetensors.torch import save_file

    from moebench import config as cfgmod
    from moebench import models

    spec = cfgmod.load_yaml("models.yaml")["gpt-oss-20b"]
    log = logging.getLogger("build")
    logging.basicConfig(level=logging.INFO)
    corpus = [f"user {i}: tell me about {w} and {w2}." for i, (w, w2) in
              enumerate(zip(["moe", "lora", "gpu", "experts"] * 200, ["memory", "speed", "nf4", "bf16"] * 200))]
    bf16 = WORK / "bf16"
    info = models.build(spec, a.scale, "random-init", str(bf16), 0, corpus, log, a.device, a.layers)
    from safetensors import safe_open

    sd = {}
    for f in sorted(bf16.glob("*.safetensors")):
        with safe_open(str(f), framework="pt", device=a.device) as h:
            for k in h.keys():
                sd[k] = h.get_tensor(k)
    aux = [p for p in bf16.iterdir() if p.suffix != ".safetensors" and p.name != "model.safetensors.index.json"]

    def write(dirname, tensors):
        d = WORK / dirname
        d.mkdir(parents=True, exist_ok=True)
        for p in aux:
            shutil.copy(p, d / p.name)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})

    # released-style MXFP4 experts (what e4b's loader reads for gpt_oss)
    mx = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
            b, s = to_mxfp4(v)
            mx[k + "_blocks"], mx[k + "_scales"] = b, s
        else:
            mx[k] = v
    write("mxfp4", mx)
    if not a.modulelist:
        return {"build": info, "n_tensors": {"bf16": len(sd), "mxfp4": len(mx)}}
    # Unsloth's bnb GPT-OSS layout: per-expert nn.Linear (weight [out, in]) and router.linear
    ml = {}
    for k, v in sd.items():
        if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj"):
            leaf = "gate_up_projs" if "gate_up" in k else "down_projs"
            base = k.rsplit(".", 1)[0]
            bias = sd[k + "_bias"]
            for e in range(v.shape[0]):
                ml[f"{base}.{leaf}.{e}.weight"] = v[e].t().contiguous()
                ml[f"{base}.{leaf}.{e}.bias"] = bias[e].contiguous()
        elif k.endswith("_proj_bias") and ".experts." in k:
            continue
        elif k.endswith("mlp.router.weight") or k.endswith("mlp.router.bias"):
            ml[k.replace("mlp.router.", "mlp.router.linear.")] = v
        else:
            ml[k] = v
    write("modulelist", ml)
    return {"build": info, "dirs": {d: sorted(p.name for p in (WORK / d).iterdir()) for d in
                                    ("bf16", "mxfp4", "modulelist")},
            "n_tensors": {"bf16": len(sd), "mxfp4": len(mx), "modulelist": len(ml)}}


def _train(model, a, res):
    """Warm-up then timed steps (CUDA events); expert-adapter gradients checked on the last step."""
    import torch

    vocab = min(8192, int(model.config.vocab_size))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, vocab, (a.batch, a.seq), device="cuda", generator=g)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    torch.cuda.synchronize()
    res["mem_after_load_gb"] = torch.cuda.memory_allocated() / 2**30
    res["peak_during_load_gb"] = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(a.warmup + a.steps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        opt.zero_grad(set_to_none=True)
        s.record()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        last = i == a.warmup + a.steps - 1
        if last:
            grads = {"expert": [0, 0, 0], "other": [0, 0, 0]}  # nonzero, zero, none
            for n, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                k = "expert" if "experts" in n else "other"
                grads[k][2 if p.grad is None else (0 if bool(p.grad.abs().sum() > 0) else 1)] += 1
            res["grads_last_step"] = {k: dict(zip(("nonzero", "zero", "none"), v)) for k, v in grads.items()}
        opt.step()
        e.record()
        torch.cuda.synchronize()
        losses.append(float(out.loss))
        if i >= a.warmup:
            times.append(s.elapsed_time(e) / 1000)
    res["losses"] = losses
    res["step_s"] = times
    res["step_s_median"] = sorted(times)[len(times) // 2] if times else None
    res["peak_train_gb"] = torch.cuda.max_memory_allocated() / 2**30
    res["tokens_per_step"] = a.batch * a.seq


def _plan(a, backend="grouped_mm"):
    return {"seq_len": a.seq, "batch": a.batch, "moe_backend": backend, "gradient_checkpointing": True,
            "dtype": "bfloat16"}


def child_arm(a, res):
    import importlib

    from moebench.arms.base import LoRASpec

    v = a.variant
    lora = LoRASpec(r=16, alpha=16)
    if v.startswith("unsloth"):
        mod = importlib.import_module("moebench.arms.unsloth")
        arm = (mod.Unsloth4bit if "4bit" in v else mod.UnslothBF16)()
        t0 = time.time()
        arm.preimport()
        res["import_s"] = time.time() - t0
        backend = "unsloth_triton" if "triton" in v else "grouped_mm"
        mdir = WORK / "bf16"  # unsloth_4bit picks the sibling bf16-unsloth-bnb4 checkpoint itself
        plan = _plan(a, backend)
        if v == "unsloth_4bit_from_fused":
            plan["unsloth_4bit_from_fused_bf16"] = True
        plan["gradient_checkpointing"] = "unsloth"
        t0 = time.time()
        loaded = arm.load(str(mdir), lora, plan)
    elif v.startswith("e4b"):
        from moebench.arms.e4b import E4B4bit

        mdir = WORK / ("mxfp4" if "mxfp4" in v else "bf16")
        t0 = time.time()
        loaded = E4B4bit().load(str(mdir), lora, _plan(a))
    else:
        raise SystemExit(f"unknown variant {v}")
    res["load_s"] = time.time() - t0
    res["info"] = loaded.info
    _train(loaded.model, a, res)
    if v.startswith("unsloth"):
        from moebench.arms.unsloth import observe_backend

        res["backend_after_steps"] = observe_backend()


def child_hf(a, res):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from moebench.inspect import census, expert_lora_coverage, trainable_summary
    from moebench.io import package_versions

    kw = {}
    if a.variant == "hf_bnb4":
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(WORK / "bf16"), dtype=torch.bfloat16, device_map="cuda", **kw)
    info = {"census_after_load": census(model)}
    cfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(model, cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    info["census_after_peft"] = census(model)
    info["expert_lora"] = expert_lora_coverage(model, int(model.config.num_hidden_layers))
    info["trainable"] = trainable_summary(model)
    info["experts_implementation"] = getattr(model.config, "_experts_implementation", None)
    info["versions"] = package_versions(("transformers", "peft", "bitsandbytes", "torch"))
    res["load_s"] = time.time() - t0
    res["info"] = info
    _train(model, a, res)


def child_unsloth_make_prequant(a, res):
    """Quantize once and save, as Unsloth's -bnb-4bit checkpoints are made: load the per-expert Linear
    layout with load_in_4bit=True (bnb quantizes every expert Linear), save_pretrained."""
    import torch

    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import unsloth  # noqa: F401
    from unsloth import FastLanguageModel

    from moebench.inspect import census

    t0 = time.time()
    model, tok = FastLanguageModel.from_pretrained(model_name=str(WORK / "modulelist"), max_seq_length=a.seq,
                                                   dtype=torch.bfloat16, load_in_4bit=True, local_files_only=True)
    res["load_s"] = time.time() - t0
    res["info"] = {"census_after_load": census(model), "experts_class": type(model.model.layers[0].mlp.experts).__name__}
    out = WORK / "prequant"
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    res["saved"] = sorted(p.name for p in out.iterdir())
    from safetensors import safe_open

    keys = []
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            keys += [k for k in h.keys() if "layers.0.mlp" in k]
    res["saved_layer0_mlp_keys"] = sorted(keys)[:16]


def child_unsloth_make_bnb4(a, res):
    from moebench.arms.unsloth import bnb4_dir_for, make_bnb4_checkpoint

    t0 = time.time()
    res["info"] = make_bnb4_checkpoint(str(WORK / "bf16"), bnb4_dir_for(WORK / "bf16"), a.seq)
    res["load_s"] = time.time() - t0
    from safetensors import safe_open

    keys = []
    for f in Path(bnb4_dir_for(WORK / "bf16")).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            keys += [k for k in h.keys() if "layers.0." in k and (".0." in k.split("layers.0.")[1] or "router" in k)]
    res["saved_layer0_keys"] = sorted(keys)[:24]
    cfg = json.loads((Path(bnb4_dir_for(WORK / "bf16")) / "config.json").read_text())
    res["saved_quantization_config"] = cfg.get("quantization_config")


def child_e4b_loader_bf16(a, res):
    """e4b's own streaming loader pointed at the transformers bf16 checkpoint: what happens?"""
    import torch

    os.environ["E4B_GPTOSS_EXPERT_LORA"] = "1"
    import experts4bit_qlora as e4b

    from moebench.inspect import census

    model, _ = e4b.load_moe_4bit_streaming(str(WORK / "bf16"), "cuda", torch.bfloat16, 16, 16, quant_type="nf4")
    res["info"] = {"census": census(model), "experts_class": type(model.model.layers[0].mlp.experts).__name__}
    x = torch.randint(0, 8192, (1, 256), device="cuda")
    res["forward_loss"] = float(model(input_ids=x, labels=x).loss)


def run_child(a):
    res = {"variant": a.variant, "ok": False}
    t0 = time.time()
    try:
        if a.variant == "build":
            res.update(child_build(a))
        elif a.variant in ("hf_bf16", "hf_bnb4"):
            child_hf(a, res)
        elif a.variant == "unsloth_make_prequant":
            child_unsloth_make_prequant(a, res)
        elif a.variant == "unsloth_make_bnb4":
            child_unsloth_make_bnb4(a, res)
        elif a.variant == "e4b_loader_on_bf16":
            child_e4b_loader_bf16(a, res)
        else:
            child_arm(a, res)
        res["ok"] = True
    except BaseException as exc:  # keep everything, the parent prints it
        res["error"] = f"{type(exc).__name__}: {exc}"[:3000]
        res["traceback"] = traceback.format_exc()[-6000:]
    res["wall_s"] = time.time() - t0
    Path(a.result).write_text(json.dumps(res, indent=1, default=str))


# ------------------------------------------------------------------ parent
VARIANTS = [  # priority order; (name, timeout_s). Run 1 covered unsloth_bf16, e4b_4bit, unsloth_4bit (fused), hf_bnb4.
    ("build", 150), ("unsloth_make_bnb4", 150), ("unsloth_4bit", 170), ("e4b_loader_on_bf16", 60),
    ("e4b_4bit_mxfp4", 90), ("unsloth_bf16_triton", 150), ("hf_bf16", 80), ("unsloth_bf16", 170),
    ("e4b_4bit", 120), ("unsloth_4bit_from_fused", 170), ("hf_bnb4", 90),
]


def env_report(out: Path):
    cmds = ["nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv",
            "python3 -c 'import sys,torch;print(sys.version.split()[0],torch.__version__,torch.version.cuda)'",
            "snakemake --version", "ots --version", "python3 -m pip list 2>/dev/null | grep -iE "
            "'^(torch|transformers|peft|trl|unsloth|unsloth.zoo|bitsandbytes|experts4bit|grouped|triton|snakemake|"
            "opentimestamps|datasets|accelerate) '"]
    text = []
    for c in cmds:
        r = subprocess.run(c, shell=True, capture_output=True, text=True, timeout=60)
        text.append(f"$ {c}\n{r.stdout}{r.stderr}rc={r.returncode}\n")
    (out / "env.txt").write_text("\n".join(text))
    print("\n".join(text), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/probe-out"))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=480)
    ap.add_argument("--only", default="")
    ap.add_argument("--scale", default="full", help="models.yaml scale (tiny: CPU self-test of the build)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--modulelist", action="store_true", help="also write Unsloth's per-expert bf16 layout")
    ap.add_argument("--variant")
    ap.add_argument("--result")
    a = ap.parse_args()
    if a.variant:
        return run_child(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    env_report(out)
    only = set(filter(None, a.only.split(",")))
    results, log = [], open(out / "children.log", "w")
    for name, tmo in VARIANTS:
        if only and name not in only and name != "build":
            continue
        left = a.budget_s - (time.time() - t_start)
        if left < 30:
            results.append({"variant": name, "ok": False, "error": "not run: probe budget spent"})
            continue
        rp = WORK / f"{name}.json"
        rp.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", name, "--result", str(rp), "--layers", str(a.layers),
               "--scale", a.scale, "--device", a.device] + (["--modulelist"] if a.modulelist else []) + [
               "--seq", str(a.seq), "--batch", str(a.batch), "--warmup", str(a.warmup), "--steps", str(a.steps)]
        # moebench: installed (`pip install -e .`) or, in an uninstalled bundle, this checkout's scripts/
        env = {**os.environ, "UNSLOTH_COMPILE_LOCATION": str(WORK / "unsloth_compiled_cache"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "scripts"), os.environ.get("PYTHONPATH")]))}
        print(f"== {name} (timeout {min(tmo, left):.0f}s)", flush=True)
        t0 = time.time()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=min(tmo, left), cwd=str(WORK), env=env)
            text, rc = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired as exc:
            text = ((exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")) + \
                   ((exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or ""))
            rc = "timeout"
        log.write(f"\n\n######## {name} rc={rc} {time.time() - t0:.1f}s\n{text[-40000:]}")
        log.flush()
        res = json.loads(rp.read_text()) if rp.exists() else {"variant": name, "ok": False,
                                                              "error": f"child rc={rc}, no result", "tail": text[-3000:]}
        res["rc"], res["child_s"] = rc, time.time() - t0
        results.append(res)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        print(json.dumps({k: res.get(k) for k in ("variant", "ok", "error", "step_s_median", "peak_train_gb",
                                                  "mem_after_load_gb")}, default=str), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print("\n%-24s %-5s %-9s %-8s %-8s %-10s %s" % ("variant", "ok", "step_s", "load_gb", "peak_gb", "exp4bit",
                                                   "backend / error"))
    for r in results:
        info = r.get("info") or {}
        c = info.get("census") or info.get("census_after_load") or {}
        be = (r.get("backend_after_steps") or {}).get("moe_backend_gpt_oss") or info.get("expert_backend") or ""
        print("%-24s %-5s %-9s %-8s %-8s %-10s %s" % (
            r["variant"], r.get("ok"), _f(r.get("step_s_median")), _f(r.get("mem_after_load_gb")),
            _f(r.get("peak_train_gb")), c.get("experts_4bit", ""), (be or r.get("error", ""))[:90]))
    print(f"total {time.time() - t_start:.0f}s")


def _f(x):
    return "" if x is None else f"{x:.3f}"


if __name__ == "__main__":
    main()
