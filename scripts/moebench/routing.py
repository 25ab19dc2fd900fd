"""Expert routing: the MoE shape of any family, a Zipf-law routing skew for random-init models, and the
router load actually seen (tokens per expert, counted from each router's top-k choice).

A random-init router does not spread tokens evenly, and not as a trained one does: measured in the arms'
warm-up on GPU, max/mean expert load is 4.9 for GPT-OSS-20B, ~7 for OLMoE and ~13 of a possible 16 for
Qwen3-30B-A3B (many tokens pick the same experts; why is not measured here), where a trained router is
trained to balance its load (an auxiliary loss). `router_calibration` sets a random-init model's load at build
(`model.router_load`: raw, balanced or a max/mean target), `apply_skew` makes it more uneven still, on purpose,
so the arms can be compared under skew, and `RouterLoad` measures what the routers really did: a setting is
never reported as the load.
"""
from __future__ import annotations

import math
import re

# The router module of each decoder layer, by family: GPT-OSS `mlp.router` (weight + bias), Qwen3-MoE and
# OLMoE `mlp.gate` (weight only).
ROUTER_SUFFIXES = ("mlp.router", "mlp.gate")


def moe_shape(cfg) -> dict:
    """One view of a MoE config across families (GPT-OSS names differ from Qwen3/OLMoE's)."""
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    inter = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    types = getattr(cfg, "layer_types", None) or []
    return {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "expert_inter": inter,
            "experts": int(experts or 0), "top_k": int(getattr(cfg, "num_experts_per_tok", 1) or 1),
            "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads, "head_dim": head_dim,
            "vocab": cfg.vocab_size, "window": getattr(cfg, "sliding_window", 0) or 0,
            "sliding_layers": sum(t == "sliding_attention" for t in types)}


def routers(model):
    """(layer index, router module) for every MoE layer, whatever the family calls its router."""
    out = []
    for name, mod in model.named_modules():
        if name.endswith(ROUTER_SUFFIXES) and hasattr(mod, "weight"):
            m = re.search(r"layers\.(\d+)\.", name)
            out.append((int(m.group(1)) if m else -1, mod))
    return out


def zipf_log_prior(n: int, strength: float, generator):
    """log p_e - mean for p_e proportional to rank^-strength, ranks shuffled (which experts are hot is random)."""
    import torch

    rank = torch.randperm(n, generator=generator).double() + 1.0
    logp = -strength * torch.log(rank)
    return logp - logp.mean()


def apply_skew(model, strength: float, seed: int) -> dict:
    """Skew every router by a Zipf law of exponent `strength` (0 = untouched).

    A router with a bias (GPT-OSS) gets the log-prior added to its bias, which multiplies each expert's
    softmax weight by its Zipf share. A router without one (Qwen3, OLMoE) gets no new parameter (the checkpoint
    keeps the published layout): its weight rows are scaled by exp(prior/2), so hot experts have wider logits
    and win the top-k more often. Either way the resulting load is measured, not assumed (`RouterLoad`)."""
    import torch

    if strength <= 0:
        return {"routing_skew": 0.0, "how": "none"}
    g = torch.Generator().manual_seed(seed)
    hows = set()
    with torch.no_grad():
        for _, r in routers(model):
            prior = zipf_log_prior(r.weight.shape[0], strength, g)
            bias = getattr(r, "bias", None)
            if bias is not None:
                bias.add_(prior.to(bias.device, bias.dtype))
                hows.add("bias += Zipf log-prior")
            else:
                r.weight.mul_(torch.exp(prior / 2).to(r.weight.device, r.weight.dtype)[:, None])
                hows.add("weight rows *= exp(Zipf log-prior / 2)")
    if not hows:
        raise ValueError("routing_skew > 0 but the model has no router module named "
                         f"{' or '.join(ROUTER_SUFFIXES)}: cannot skew this family")
    return {"routing_skew": strength, "how": "; ".join(sorted(hows)), "seed": seed}


def summary(counts: list[float]) -> dict:
    """Load of one layer's router: entropy of the token share per expert (nats, and as a fraction of log E,
    1 = perfectly even), max/mean load and unused experts."""
    total, n = float(sum(counts)), len(counts)
    if total <= 0 or n == 0:
        return {"tokens": total, "entropy": None, "entropy_norm": None, "max_over_mean": None, "unused": n}
    p = [c / total for c in counts]
    h = -sum(x * math.log(x) for x in p if x > 0)
    return {"tokens": total, "entropy": h, "entropy_norm": h / math.log(n) if n > 1 else 1.0,
            "max_over_mean": max(counts) / (total / n), "unused": sum(c == 0 for c in counts)}


class RouterLoad:
    """Tokens per expert per layer, from each router's top-k indices while `counting` is on. Counts stay on the
    device: each layer's tally is allocated once and the hook adds into it with `index_add_`, which never
    reads a value back (CUDA `torch.bincount` reads the largest index to the host: a sync per layer and step).
    `mark()` snapshots the running tallies (still on the device) so a window, e.g. the timed steps, can be
    read once at its end (`window`); `counts()` reads everything counted."""

    def __init__(self, model, num_experts: int, top_k: int):
        import torch

        self.torch = torch
        self.num_experts, self.top_k = num_experts, top_k
        self.counting = False
        self.keeping = False  # keep each layer's top-k sets of the last forward (picks), e.g. to compare two models
        self.picks: dict = {}
        self.marks: list = []  # cumulative [layer, expert] tallies at each mark(), on the device
        found = routers(model) if num_experts > 0 else []  # no expert count: nothing to count into
        # allocated up front, so the hook (possibly traced into a compiled layer) only adds in place
        self.tallies = {layer: torch.zeros(num_experts, dtype=torch.long, device=_device(mod))
                        for layer, mod in found}
        self.hooks = [mod.register_forward_hook(self._hook(layer)) for layer, mod in found]

    @classmethod
    def of(cls, model) -> "RouterLoad":
        """Hooks on `model`'s routers, with the expert count and top-k read from its config."""
        cfg = getattr(model, "config", None)
        shape = moe_shape(cfg) if cfg is not None else {"experts": 0, "top_k": 1}
        return cls(model, shape["experts"], shape["top_k"])

    def _hook(self, layer: int):
        def hook(_mod, _inp, out):
            if not (self.counting or self.keeping):
                return
            idx = self._indices(out)
            if idx is None:
                return
            if self.keeping:
                self.picks[layer] = idx.detach().reshape(-1, idx.shape[-1]).sort(-1).values.cpu()
            if not self.counting:
                return
            flat = idx.detach().reshape(-1).long()
            tally = self.tallies[layer]
            tally.index_add_(0, flat.to(tally.device), self.torch.ones_like(flat, device=tally.device))
        return hook

    def _indices(self, out):
        """Routers that return (logits, scores, indices) give their indices; one that returns logits only is read
        by its top-k."""
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for t in outs:
            if self.torch.is_tensor(t) and not t.is_floating_point():
                return t
        for t in outs:
            if self.torch.is_tensor(t) and t.shape[-1] == self.num_experts:
                return t.detach().topk(self.top_k, dim=-1).indices
        return None

    def mark(self) -> None:
        """Snapshot the running tallies (device to device, no sync): call at a window's start and after each
        of its steps."""
        if self.tallies:
            dev = next(iter(self.tallies.values())).device
            self.marks.append(self.torch.stack([t.to(dev) for t in self.tallies.values()]))

    def snapshot(self) -> dict:
        """The running tallies copied on the device (no sync): a snapshot taken after the first step holds that
        step's load; `read` brings it to the host."""
        return {layer: t.clone() for layer, t in self.tallies.items()}

    @staticmethod
    def read(tallies: dict) -> dict[int, list[int]]:
        """Tokens per expert per layer of `tallies` (the running ones or a snapshot), on the host, by layer; a
        layer whose router never reported is left out."""
        out = {layer: [int(x) for x in t.cpu()] for layer, t in sorted(tallies.items())}
        return {layer: c for layer, c in out.items() if sum(c)}

    def window(self, start: int = 0, end: int | None = None) -> dict[int, list[int]]:
        """Tokens per expert per layer between marks `start` and `end` (default: the last); read to the host
        here, once. Marks 0..n bracket n steps, so steps i..j (from 0) are window(i, j + 1)."""
        if not self.marks:
            return {}
        end = len(self.marks) - 1 if end is None else end
        diff = (self.marks[end] - self.marks[start]).cpu()
        return {layer: [int(x) for x in row] for layer, row in zip(self.tallies, diff) if int(row.sum()) > 0}

    def counts(self) -> dict[int, list[int]]:
        """Everything counted, per layer that reported (a layer whose router never reported is left out)."""
        return self.read(self.tallies)

    def overall(self, counts: dict[int, list[int]] | None = None) -> dict:
        """Mean over layers of each layer's summary of `counts` (default: everything counted); {} when no
        router reported."""
        return overall(self.counts() if counts is None else counts)

    def drift(self) -> dict:
        """The load of the first and the last quarter of the marked steps and how far it moved: mean over
        layers of the total-variation distance between the two token shares per expert (0 = the same
        routing, 1 = disjoint experts). {} with fewer than two marked steps."""
        n = len(self.marks) - 1
        if n < 2:
            return {}
        q = max(1, n // 4)
        return load_drift(self.window(0, q), self.window(n - q, n)) | {"quarter_steps": q}

    @staticmethod
    def flips(a: dict, b: dict) -> float | None:
        """Fraction of (token, layer) pairs whose top-k expert set differs between two `picks`: top-k routing
        is discontinuous, so a tiny numeric difference can send a token to another expert."""
        layers = sorted(set(a) & set(b))
        n = sum(a[l].shape[0] for l in layers)
        if not n:
            return None
        return sum(int((a[l] != b[l]).any(-1).sum()) for l in layers) / n

    def remove(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []


def _device(mod):
    """Where a router's tally lives: beside its weight (a weight still on the meta device counts on the CPU)."""
    dev = mod.weight.device
    return "cpu" if dev.type == "meta" else dev


def overall(counts: dict[int, list[int]]) -> dict:
    """Mean over layers of each layer's `summary` (layers with no tokens left out); {} when none counted."""
    per = [summary(c) for c in counts.values()]
    per = [s for s in per if s["entropy_norm"] is not None]
    if not per:
        return {}
    return {k: sum(s[k] for s in per) / len(per) for k in ("entropy_norm", "max_over_mean", "unused")} | {
        "layers": len(per), "max_over_mean_worst": max(s["max_over_mean"] for s in per)}


def load_drift(first: dict[int, list[int]], last: dict[int, list[int]]) -> dict:
    """How routing moved between two windows: max/mean load of each and the mean over layers of the
    total-variation distance between their token shares per expert (0 = same shares, 1 = disjoint)."""
    layers = [l for l in first if l in last and sum(first[l]) and sum(last[l])]
    if not layers:
        return {}
    tv = []
    for l in layers:
        a, b = sum(first[l]), sum(last[l])
        tv.append(0.5 * sum(abs(x / a - y / b) for x, y in zip(first[l], last[l])))
    return {"tv": sum(tv) / len(tv), "layers": len(layers),
            "max_over_mean_first": overall({l: first[l] for l in layers})["max_over_mean"],
            "max_over_mean_last": overall({l: last[l] for l in layers})["max_over_mean"]}
