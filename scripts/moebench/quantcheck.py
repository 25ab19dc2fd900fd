"""Is a pre-quantized GPT-OSS checkpoint the model it claims to be? Checked before anything is timed on it.

A loss comparison cannot tell: a random-init model sits at ≈ ln(vocab) whatever its experts hold. So this reads
both checkpoints tensor by tensor and compares what each computes on one fixed, seeded batch of inputs:
  - routers and every bias identical (the 4-bit layout stores them unquantized);
  - each expert's output (GPT-OSS's clamped SwiGLU: gate_up, then down) within `expert_rtol` of the bf16
    expert's, as relative L2 error — nf4 on Gaussian weights lands near 0.1;
  - each layer's MoE output (the router's top-k mix of those experts) within `layer_rtol`.
A negative control runs the same check with one expert scrambled (its weights permuted): the check must fail on
it, or it proves nothing. Writes a JSON record; exits 1 when the check fails or the control passes.

    python -m moebench.quantcheck --bf16 results/<run>/model --q results/<run>/model-unsloth-bnb4 --out check.json
"""
from __future__ import annotations

import argparse
import bisect
import json
import re
import sys
import time
from pathlib import Path

EXPERT_RTOL = 0.25  # nf4 (blocksize 64) on Gaussian init: ≈0.1 per expert; a scrambled expert: ≈1.4
LAYER_RTOL = 0.2
ALPHA, LIMIT = 1.702, 7.0  # GptOssExperts' gate: transformers' modeling_gpt_oss


def expert_out(x, w_gu, b_gu, w_d, b_d):
    """One GPT-OSS expert as transformers computes it: w_gu [H, 2I] (gate and up interleaved), w_d [I, H]."""
    gate_up = x @ w_gu + b_gu
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate, up = gate.clamp(max=LIMIT), up.clamp(min=-LIMIT, max=LIMIT)
    glu = gate * (gate * ALPHA).sigmoid()
    return ((up + 1) * glu) @ w_d + b_d


def rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float32."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def moe_out(x, router_w, router_b, top_k: int, experts: list):
    """The layer's MoE output: top-k of the router logits, softmax over those, the experts' outputs mixed."""
    import torch

    logits = x @ router_w.t() + router_b
    top, idx = torch.topk(logits, top_k, dim=-1)
    w = torch.softmax(top.float(), dim=-1)
    out = torch.zeros(x.shape[0], experts[0][3].shape[-1], dtype=torch.float32, device=x.device)
    for e, ex in enumerate(experts):
        rows, slot = torch.where(idx == e)
        if rows.numel():
            out.index_add_(0, rows, expert_out(x[rows], *ex).float() * w[rows, slot, None])
    return out


# ---- the two checkpoint layouts ---------------------------------------------------------------------------------
class Tensors:
    """Every tensor of a safetensors checkpoint by name, read lazily (multi-GB checkpoints: one tensor at a time).
    Each file is opened once: reopening parses its whole header, and the 4-bit layout reads ~10k small tensors."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        from safetensors import safe_open

        self.device, self.where, self.handles = device, {}, {}
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            h = self.handles[f] = safe_open(str(f), framework="pt", device=device)
            for k in h.keys():
                self.where[k] = f
        if not self.where:
            raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
        self.keys = sorted(self.where)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def __getitem__(self, key: str):
        return self.handles[self.where[key]].get_tensor(key)

    def find(self, pattern: str) -> list[str]:
        rx = re.compile(pattern)
        return [k for k in self.keys if rx.search(k)]

    def under(self, prefix: str) -> list[str]:
        """Keys that start with prefix (a bisect on the sorted keys, not a scan)."""
        i = bisect.bisect_left(self.keys, prefix)
        j = bisect.bisect_left(self.keys, prefix + "\U0010ffff")
        return self.keys[i:j]


class FusedBF16:
    """transformers' GPT-OSS layout: experts fused per layer ([E, H, 2I] gate_up, [E, I, H] down)."""

    def __init__(self, t: Tensors):
        self.t = t

    def router(self, layer: int):
        p = f"model.layers.{layer}.mlp.router."
        return self.t[p + "weight"], self.t[p + "bias"]

    def experts(self, layer: int) -> list:
        p = f"model.layers.{layer}.mlp.experts."
        gu, gub, d, db = (self.t[p + k] for k in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"))
        return [(gu[e], gub[e], d[e], db[e]) for e in range(gu.shape[0])]


class PerExpert4bit:
    """Unsloth's bnb-4bit GPT-OSS layout: experts.gate_up_projs.<e> / down_projs.<e> Linear modules (weight
    [out, in], nf4 with its quant-state tensors beside it), the router as router(.linear).weight/bias.
    `dequant(tensors, key)` turns a stored 4-bit weight back into its [out, in] float tensor."""

    def __init__(self, t: Tensors, dequant):
        self.t, self.dequant = t, dequant

    def router(self, layer: int):
        keys = self.t.find(rf"^model\.layers\.{layer}\.mlp\.router\.(linear\.)?weight$")
        if not keys:
            raise KeyError(f"layer {layer}: no router weight in the 4-bit checkpoint")
        w = keys[0]
        return self.t[w], self.t[w.removesuffix("weight") + "bias"]

    def experts(self, layer: int) -> list:
        p = f"model.layers.{layer}.mlp.experts."
        n = sum(1 for k in self.t.under(p + "gate_up_projs.") if re.fullmatch(r"\d+\.weight", k[len(p) + 14:]))
        if not n:
            raise KeyError(f"layer {layer}: no per-expert gate_up_projs in the 4-bit checkpoint")
        out = []
        for e in range(n):
            gu, d = (self.dequant(self.t, f"{p}{leaf}.{e}.weight") for leaf in ("gate_up_projs", "down_projs"))
            out.append((gu.t(), self.t[f"{p}gate_up_projs.{e}.bias"], d.t(), self.t[f"{p}down_projs.{e}.bias"]))
        return out


def bnb_dequant(t: Tensors, key: str):
    """bitsandbytes' own dequantization of a saved Params4bit (its quant-state tensors sit beside the weight)."""
    import bitsandbytes.functional as F

    stats = {k[len(key) + 1:]: t[k] for k in t.under(key + ".")}
    qs = F.QuantState.from_dict(stats, device=t.device)
    return F.dequantize_4bit(t[key], qs)


# ---- the check -------------------------------------------------------------------------------------------------
def scramble(experts: list, e: int, seed: int = 0) -> list:
    """The negative control: expert e's weights permuted (same values, same scale, wrong places)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = list(experts)
    w_gu, b_gu, w_d, b_d = out[e]
    perm = lambda w: w.flatten()[torch.randperm(w.numel(), generator=g).to(w.device)].view_as(w)
    out[e] = (perm(w_gu), b_gu, perm(w_d), b_d)
    return out


def check_layer(layer: int, ref, q, x, top_k: int, control: int | None = None) -> dict:
    """One layer: identical routers and biases, per-expert and MoE-output errors on the batch x."""
    import torch

    rw, rb = ref.router(layer)
    qw, qb = q.router(layer)
    ex_ref, ex_q = ref.experts(layer), q.experts(layer)
    if control is not None:
        ex_q = scramble(ex_q, control, seed=layer)
    dev, dt = x.device, x.dtype
    cast = lambda ex: [tuple(t.to(dev, dt) for t in e) for e in ex]
    ex_ref, ex_q = cast(ex_ref), cast(ex_q)
    same_router = torch.equal(rw.cpu(), qw.to(rw.dtype).cpu()) and torch.equal(rb.cpu(), qb.to(rb.dtype).cpu())
    same_bias = all(torch.equal(a[1], b[1]) and torch.equal(a[3], b[3]) for a, b in zip(ex_ref, ex_q))
    errs = [rel(expert_out(x, *b), expert_out(x, *a)) for a, b in zip(ex_ref, ex_q)]
    r_w, r_b = rw.to(dev, dt), rb.to(dev, dt)
    layer_err = rel(moe_out(x, r_w, r_b, top_k, ex_q), moe_out(x, r_w, r_b, top_k, ex_ref))
    return {"layer": layer, "experts": len(errs), "same_router": bool(same_router), "same_biases": bool(same_bias),
            "expert_rel_err_max": max(errs), "expert_rel_err_median": sorted(errs)[len(errs) // 2],
            "worst_expert": errs.index(max(errs)), "moe_rel_err": layer_err}


def judge(layers: list[dict], expert_rtol: float, layer_rtol: float) -> tuple[bool, list[str]]:
    problems = []
    for l in layers:
        if not l["same_router"]:
            problems.append(f"layer {l['layer']}: router differs")
        if not l["same_biases"]:
            problems.append(f"layer {l['layer']}: expert biases differ")
        if l["expert_rel_err_max"] > expert_rtol:
            problems.append(f"layer {l['layer']}: expert {l['worst_expert']} rel err {l['expert_rel_err_max']:.3f}"
                            f" > {expert_rtol}")
        if l["moe_rel_err"] > layer_rtol:
            problems.append(f"layer {l['layer']}: MoE output rel err {l['moe_rel_err']:.3f} > {layer_rtol}")
    return not problems, problems


def run_check(ref, q, num_layers: int, hidden: int, top_k: int, device: str = "cpu", tokens: int = 256,
              seed: int = 0, expert_rtol: float = EXPERT_RTOL, layer_rtol: float = LAYER_RTOL,
              control: tuple[int, int] | None = (0, 0), log=print) -> dict:
    """The check on every layer, then the negative control (layer, expert scrambled) on its layer."""
    import torch

    g = torch.Generator().manual_seed(seed)
    # a fixed batch shaped like what a MoE block sees: RMS-normalised hidden states (unit RMS per token)
    x = torch.randn(tokens, hidden, generator=g).to(device, torch.bfloat16)
    t0 = time.perf_counter()
    layers = []
    for i in range(num_layers):
        layers.append(check_layer(i, ref, q, x, top_k))
        log(f"quantcheck layer {i + 1}/{num_layers}: expert rel err max {layers[-1]['expert_rel_err_max']:.4f}, "
            f"MoE {layers[-1]['moe_rel_err']:.4f}")
    ok, problems = judge(layers, expert_rtol, layer_rtol)
    out = {"passed": ok, "problems": problems, "expert_rtol": expert_rtol, "layer_rtol": layer_rtol,
           "tokens": tokens, "seed": seed, "layers": layers, "seconds": round(time.perf_counter() - t0, 1)}
    if control is not None:
        li, e = control
        c = check_layer(li, ref, q, x, top_k, control=e)
        c_ok, c_problems = judge([c], expert_rtol, layer_rtol)
        out["negative_control"] = {"layer": li, "expert": e, "check_passed": c_ok, "problems": c_problems, **c}
        out["control_failed_as_it_must"] = not c_ok
    return out


def files(d: str) -> dict:
    """The checkpoint's files by size (a cheap fingerprint of multi-GB weights; config files hashed)."""
    import hashlib

    out = {}
    for f in sorted(Path(d).iterdir()):
        if f.is_file():
            out[f.name] = {"bytes": f.stat().st_size}
            if f.suffix == ".json":
                out[f.name]["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def make(src: str, dst: str) -> str | None:
    """Build Unsloth's checkpoint in its own process (Unsloth patches transformers at import); the error's tail
    when it fails."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "moebench.arms.unsloth", "make-bnb4", src, dst], capture_output=True,
                       text=True)
    print(r.stdout[-4000:], r.stderr[-4000:], sep="\n", flush=True)
    return None if r.returncode == 0 else f"make-bnb4 exited {r.returncode}: {(r.stderr or r.stdout)[-600:]}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bf16", required=True, help="the bf16 model directory (transformers' fused layout)")
    ap.add_argument("--q", required=True, help="the pre-quantized checkpoint (Unsloth's per-expert bnb-4bit layout)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--make", action="store_true",
                    help="build the checkpoint first; a failed build or check is then recorded (passed: false, the "
                         "arm refuses to time it) and the command exits 0, so the rest of the workflow goes on")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--expert-rtol", type=float, default=EXPERT_RTOL)
    ap.add_argument("--layer-rtol", type=float, default=LAYER_RTOL)
    a = ap.parse_args(argv)
    error = make(a.bf16, a.q) if a.make else None
    if error:
        Path(a.q).mkdir(parents=True, exist_ok=True)
        res = {"passed": False, "problems": [error], "bf16": a.bf16, "q": a.q}
    else:
        try:
            res = check_dirs(a)
        except Exception as exc:  # a layout the check does not know is a failed check, with what it found
            if not a.make:
                raise
            res = {"passed": False, "problems": [f"check crashed: {type(exc).__name__}: {exc}"], "bf16": a.bf16,
                   "q": a.q, "q_keys_layer0": _layer0_keys(a.q)}
    Path(a.out).write_text(json.dumps(res, indent=1))
    good = res["passed"] and res.get("control_failed_as_it_must", False)
    print(f"quantcheck: {'PASS' if res['passed'] else 'FAIL'}"
          f"{'' if res['passed'] else ': ' + '; '.join(res['problems'][:5])}; negative control "
          f"{'failed, as it must' if res.get('control_failed_as_it_must') else 'did not fail: the check proves nothing'}"
          f" ({res.get('seconds', '—')} s)", flush=True)
    sys.exit(0 if good or a.make else 1)


def check_dirs(a) -> dict:
    import torch

    cfg = json.loads((Path(a.bf16) / "config.json").read_text())
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ref, q = FusedBF16(Tensors(a.bf16, dev)), PerExpert4bit(Tensors(a.q, dev), bnb_dequant)
    res = run_check(ref, q, cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_experts_per_tok"], dev, a.tokens,
                    expert_rtol=a.expert_rtol, layer_rtol=a.layer_rtol, log=lambda m: print(m, flush=True))
    res["passed"] = res["passed"] and res.get("control_failed_as_it_must", False)
    return {**res, "bf16": a.bf16, "q": a.q, "device": dev, "q_files": files(a.q)}


def _layer0_keys(d: str) -> list[str]:
    try:
        return Tensors(d).find(r"layers\.0\.")[:60]
    except Exception as exc:  # noqa: BLE001 - a diagnostic only
        return [f"could not list: {exc}"]


if __name__ == "__main__":
    main()
