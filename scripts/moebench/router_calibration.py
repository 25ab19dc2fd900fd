"""Router-load calibration of a random-init MoE, once at model build (docs/routing.md has the method and anchors).

A random-init router sends tokens very unevenly (max/mean expert load 5-13 on the full models), where a trained
router is trained to balance. `model.router_load` says which load the saved model routes with:

- `raw`: the random-init routers as they are;
- `balanced`: every expert's share of the routed tokens equal (what auxiliary-loss-free balancing reaches,
  max/mean ~1.04 on large counts), i.e. the held-out load close to the noise floor of a perfectly uniform
  router on the same number of tokens (`uniform_floor`) with no unused expert;
- a number t > that floor: max/mean t on held-out tokens at the bench shape (e.g. 2.2, OLMoE's published
  per-expert counts), a Zipf-shaped load that keeps the raw router's hot experts hot.

The routers are calibrated layer by layer inside one forward pass over the calibration tokens: a pre-hook on
layer l's router fits it on its real input (the residual stream after layers 0..l-1 have been calibrated),
then the forward goes on with the fitted router. Layer inputs are never differentiated through; only router
parameters change. Both families get an auxiliary-loss-free update (DeepSeek-V3 §2.1.2: -/+ gamma by
overload/underload): routers with a bias (GPT-OSS) on the bias (which also enters GPT-OSS's gate weights, as its
softmax runs over the selected biased logits); routers without one (Qwen3, OLMoE) on a rank-1 change of the
weight along the mean input, which moves each token's logits by the common mode that makes random-init routing
so uneven (`fit_weight` says why not a full-weight load-loss optimisation). Deterministic on CPU and GPU.
"""
from __future__ import annotations

import math
import time

from . import routing

MAX_TOKENS = 16384        # calibration tokens (training conversations) and held-out tokens measured, at most
STEPS = 500               # auxiliary-loss-free updates per layer at most (each: a top-k over the layer's logits)
STOP_VIOLATION = 0.02     # stop a layer early once max_e |c_e - c*_e| / mean(c*) is this small
FLOOR_SIMS = 32           # uniform-router simulations per noise-floor estimate
BALANCED_SLACK = 1.3      # balanced is reached when the held-out max/mean, mean over layers, is <= slack * floor,
BALANCED_WORST = 1.5      # every layer's <= worst * floor, and no expert is unused
TARGET_TOLERANCE = 0.15   # a numeric target is reached when held-out max/mean is within 15 % of it


def parse(value, on_gpu: bool) -> str | float:
    """`model.router_load` -> "raw", "balanced" or a float target (max/mean). "auto" is balanced on a GPU and
    raw on the CPU tier (its tiny model's raw load is already mild, max/mean 1.3-2.3, and the CPU chain stays
    as fast as before; tests cover calibration on the tiny models)."""
    if value in (None, "auto"):
        return "balanced" if on_gpu else "raw"
    if value in ("raw", "balanced"):
        return value
    try:  # `snakemake --config model.router_load=2.2` passes the number as a string
        number = float(value)
    except (TypeError, ValueError):
        number = 0.0
    if number >= 1 and not isinstance(value, bool):
        return number
    raise ValueError(f"model.router_load={value!r}: give 'auto', 'raw', 'balanced' or a max/mean target >= 1 "
                     "(e.g. 2.2)")


def settings() -> dict:
    """The method's constants, recorded in the model's record."""
    return {"steps": STEPS,
            "stop_violation": STOP_VIOLATION, "floor_sims": FLOOR_SIMS, "balanced_slack": BALANCED_SLACK,
            "balanced_worst": BALANCED_WORST,
            "target_tolerance": TARGET_TOLERANCE}


def router_state(model) -> dict:
    """Every router tensor (weight, and bias where there is one) by its state_dict name, copied to the CPU."""
    names = {id(m): n for n, m in model.named_modules()}
    return {f"{names[id(mod)]}.{k}": v.detach().cpu().clone()
            for _, mod in routing.routers(model) for k, v in mod.named_parameters(recurse=False)}


def save_routers(path: str, raw: dict, saved: dict) -> None:
    """Both router sets in one small safetensors file ("raw/<name>", "saved/<name>"): a process can swap them in
    place to compare loads inside one process."""
    from safetensors.torch import save_file

    save_file({f"raw/{k}": v.contiguous() for k, v in raw.items()} |
              {f"saved/{k}": v.contiguous() for k, v in saved.items()}, path)


def uniform_floor(tokens: int, experts: int, top_k: int, sims: int = FLOOR_SIMS, seed: int = 0) -> float:
    """Mean max/mean load of a perfectly uniform router (each token picks top_k distinct experts at random) over
    `tokens` tokens: the load no router can be shown to beat on that many tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(sims):
        idx = torch.rand(tokens, experts, generator=g).topk(top_k, dim=-1).indices
        c = torch.bincount(idx.reshape(-1), minlength=experts).double()
        out.append(float(c.max() / c.mean()))
    return sum(out) / len(out)


def target_shares(raw_counts, target: str | float, top_k: int):
    """Share of routed (token, slot) pairs each expert should get: uniform for balanced; for a max/mean target a
    Zipf law over the raw load's ranks (hot experts stay hot), its exponent solved for max/mean = target."""
    import torch

    n = raw_counts.numel()
    if target == "balanced":
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if not 1.0 <= target <= n / top_k:
        raise ValueError(f"model.router_load={target}: a max/mean target must lie in [1, experts/top_k = "
                         f"{n / top_k:g}] (an expert gets at most every token once)")
    order = torch.argsort(-raw_counts.double(), stable=True)
    rank = torch.empty(n, dtype=torch.float64)
    rank[order] = torch.arange(1, n + 1, dtype=torch.float64)

    def shares(s):
        w = rank ** -s
        return w / w.sum()

    lo, hi = 0.0, 50.0
    for _ in range(100):  # max/mean grows monotonically with the exponent
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(shares(mid).max()) * n < target else (lo, mid)
    return shares((lo + hi) / 2)


def _topk_counts(logits, top_k: int):
    """Tokens per expert of a top-k choice over logits (softmax is monotonic: Qwen3/OLMoE's top-k of the
    probabilities is the top-k of the logits)."""
    import torch

    idx = logits.topk(top_k, dim=-1).indices
    return torch.bincount(idx.reshape(-1), minlength=logits.shape[-1]).double().cpu()


def _violation(c, want) -> float:
    return float((c - want).abs().max() / want.mean())


def _sign_fit(base, scale, shares, top_k: int, steps: int = STEPS):
    """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2) of logits `base + scale * delta`: delta_e += gamma *
    sign(c*_e - c_e) from the top-k counts c, gamma decaying geometrically from a tenth of the logits' spread;
    returns (best delta, record)."""
    import torch

    want = shares * base.shape[0] * top_k
    delta = torch.zeros(base.shape[1], dtype=base.dtype, device=base.device)
    gamma0, decay = 0.1 * float(base.std()), 1e-3 ** (1.0 / max(steps, 1))
    best = (math.inf, delta.clone(), 0)
    for step in range(steps + 1):
        c = _topk_counts(base + scale * delta, top_k)
        v = _violation(c, want)
        if v < best[0]:
            best = (v, delta.clone(), step)
        if v <= STOP_VIOLATION or step == steps:
            break
        delta += gamma0 * decay ** step * torch.sign(want - c).to(delta)
    return best[1], {"steps": step, "best_step": best[2], "violation": best[0]}


def fit_bias(router, x, shares, top_k: int) -> dict:
    """GPT-OSS: the sign update on the router's own bias (fp32 master, written in the bias's dtype)."""
    import torch

    b0 = router.bias.detach().float()
    base = x.float() @ router.weight.float().T + b0
    delta, rec = _sign_fit(base, 1.0, shares, top_k)
    with torch.no_grad():
        router.bias.copy_((b0 + delta).to(router.bias.dtype))
    return {"method": "bias: auxiliary-loss-free sign update", **rec}


def fit_weight(router, x, shares, top_k: int) -> dict:
    """Qwen3/OLMoE (no bias): the same update on a rank-1 change of the weight along the mean input u = mu/|mu|^2,
    W += delta u^T. A token's logit then moves by delta_e * (x_t . u): exactly the common mode x_t . mu scales,
    which is what makes a random-init router send most tokens to the same experts. (A full-weight Adam run on a
    Switch-style load loss overfit at full width, 2,048 x 128: 2 % off on calibration tokens, max/mean 2.7
    held out, and did not converge in 300 steps on deeper layers.)"""
    import torch

    xs, w0 = x.float(), router.weight.detach().float()
    mu = xs.mean(0)
    u = mu / mu.dot(mu).clamp_min(1e-12)
    delta, rec = _sign_fit(xs @ w0.T, (xs @ u)[:, None], shares, top_k)
    with torch.no_grad():
        router.weight.copy_((w0 + delta[:, None] * u[None, :]).to(router.weight.dtype))
    return {"method": "weight: sign update along the mean input (rank 1)", **rec}


def _load_pass(model, ids, hook_fn) -> None:
    """One no-grad forward of the decoder (no LM head: its logits are not needed) with a pre-hook on every
    router."""
    import torch

    hooks = [mod.register_forward_pre_hook(hook_fn(layer, mod)) for layer, mod in routing.routers(model)]
    try:
        with torch.no_grad():
            model.base_model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def measure(model, ids, experts: int) -> dict[int, list[int]]:
    """Tokens per expert per layer for input ids, from each router's own top-k choice."""
    import torch

    counts = {}

    def hook_fn(layer, mod):
        def hook(_m, args):
            out = mod.forward(args[0].reshape(-1, args[0].shape[-1]))  # the router's own choice, hooks bypassed
            idx = next(t for t in out if torch.is_tensor(t) and not t.is_floating_point())
            counts[layer] = torch.bincount(idx.reshape(-1), minlength=experts)[:experts].tolist()
        return hook

    _load_pass(model, ids, hook_fn)
    return counts


def _check(model, target, floor: float, eval_tokens: int, experts: int, top_k: int) -> None:
    if not routing.routers(model):
        raise ValueError(f"model.router_load={target!r}: {type(model).__name__} has no router module named "
                         f"{' or '.join(routing.ROUTER_SUFFIXES)}: use router_load: raw")
    if target == "balanced":
        return
    if target <= floor * (1 + TARGET_TOLERANCE):
        raise ValueError(f"model.router_load={target}: at or below the noise floor of a uniform router on "
                         f"{eval_tokens} tokens (max/mean {floor:.3f}): use router_load: balanced")
    if target > experts / top_k:
        raise ValueError(f"model.router_load={target}: above experts/top_k = {experts / top_k:g}, the most "
                         "uneven load possible (every token on the same experts)")


def _fit_hook(fits: dict, target, top_k: int, log):
    """Pre-hook factory: fit layer l's router on its real input, then let the forward go on with it."""
    import torch

    def hook_fn(layer, mod):
        def hook(_m, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            bias = getattr(mod, "bias", None)
            logits = x.float() @ mod.weight.float().T + (0 if bias is None else bias.float())
            shares = target_shares(_topk_counts(logits, top_k), target, top_k)
            fit = fit_bias if bias is not None else fit_weight
            threads = torch.get_num_threads()
            if x.device.type == "cpu":  # tiny matrices: threads only contend (a step took 5x longer on 2 cores)
                torch.set_num_threads(1)
            try:
                fits[layer] = fit(mod, x, shares, top_k)
            finally:
                torch.set_num_threads(threads)
            log.info("router_load: layer %d fitted (%s, %d steps, violation %.3f on calibration tokens)",
                     layer, fits[layer]["method"], fits[layer]["steps"], fits[layer]["violation"])
        return hook
    return hook_fn


def calibrate(model, cal_ids, eval_ids, target: str | float, seed: int, log) -> dict:
    """Fit every router to `target` on cal_ids (one forward, layer by layer), then measure the held-out load on
    eval_ids (the floor is simulated on as many tokens). Returns the record: target, floor, per-layer load
    before and after, fit of each layer, seconds."""
    import torch

    shape = routing.moe_shape(model.config)
    experts, top_k = shape["experts"], shape["top_k"]
    t0 = time.perf_counter()
    eval_tokens = int(eval_ids.numel())
    floor = uniform_floor(eval_tokens, experts, top_k, seed=seed)
    _check(model, target, floor, eval_tokens, experts, top_k)
    before = measure(model, eval_ids, experts)
    fits: dict = {}
    _load_pass(model, cal_ids, _fit_hook(fits, target, top_k, log))
    after = measure(model, eval_ids, experts)
    layers = {l: {"before": routing.summary(before[l]), "after": routing.summary(after[l]), **fits[l]}
              for l in sorted(fits)}
    rec = {"router_load": target, "seed": seed, "calibration_tokens": int(cal_ids.numel()),
           "eval_tokens": eval_tokens, "uniform_floor": floor, **_verdict(layers, target, floor),
           "seconds": time.perf_counter() - t0, "settings": settings(),
           "layers": {str(l): v for l, v in layers.items()}}
    log.info("router_load %s: held-out max/mean %.2f -> %.2f (worst layer %.2f; uniform floor %.2f on %d "
             "tokens), unused experts %d -> %d, %s, %.1f s", target, _mean(layers, "before"),
             _mean(layers, "after"), rec["worst_layer_max_over_mean"], floor, eval_tokens,
             sum(s["before"]["unused"] for s in layers.values()), rec["unused_experts"],
             "target reached" if rec["reached"] else "TARGET NOT REACHED", rec["seconds"])
    return rec


def _verdict(layers: dict, target, floor: float) -> dict:
    """Balanced: the held-out max/mean within BALANCED_SLACK of the floor on average over layers, within
    BALANCED_WORST in every layer, and no unused expert; a number: every layer within TARGET_TOLERANCE of it."""
    after = [s["after"] for s in layers.values()]
    worst, unused = max(a["max_over_mean"] for a in after), sum(a["unused"] for a in after)
    if target == "balanced":
        reached = (_mean(layers, "after") <= BALANCED_SLACK * floor and worst <= BALANCED_WORST * floor
                   and unused == 0)
    else:
        reached = all(abs(a["max_over_mean"] - target) <= TARGET_TOLERANCE * target for a in after)
    return {"reached": reached, "max_over_mean": _mean(layers, "after"), "worst_layer_max_over_mean": worst,
            "unused_experts": unused}


def _mean(layers: dict, when: str) -> float:
    return sum(s[when]["max_over_mean"] for s in layers.values()) / len(layers)


# ---- the calibration record as rows (aggregate puts them in metrics.csv; the audit re-derives them) ---------
RECORD_ROWS = (  # metric, unit, how to read it from routing.calibration
    ("router_heldout_max_over_mean_before", "ratio", lambda c: _mean(c["layers"], "before")),
    ("router_heldout_max_over_mean_after", "ratio", lambda c: c["max_over_mean"]),
    ("router_heldout_worst_layer_after", "ratio", lambda c: c["worst_layer_max_over_mean"]),
    ("router_uniform_floor", "ratio", lambda c: c["uniform_floor"]),
    ("router_unused_experts_before", "count", lambda c: sum(v["before"]["unused"] for v in c["layers"].values())),
    ("router_unused_experts_after", "count", lambda c: c["unused_experts"]),
    ("router_target_reached", "flag", lambda c: int(bool(c["reached"]))),
    ("router_calibration_s", "s", lambda c: c["seconds"]),
)


def record_rows(model_sha: str, run: str, tier: str, model: str, source: str | None = None) -> list:
    """The model build's router calibration (results/<run>/model.sha256, `routing.calibration`) as stage `model`
    rows, sourced from that file: none for raw routers or a from_pretrained model (nothing was fitted)."""
    import json
    from pathlib import Path

    from .metrics import Row

    p = Path(model_sha)
    cal = ((json.loads(p.read_text()).get("routing") or {}).get("calibration") or {}) if p.is_file() else {}
    if not cal.get("layers"):
        return []
    n = len(cal["layers"])
    return [Row(run, tier, model, "all", "", "model", metric, float(get(cal)), unit, n=n,
                source=source or str(model_sha))
            for metric, unit, get in RECORD_ROWS]
