"""Why router calibration does not carry to held-out tokens on Qwen3 (issue 20): a CPU probe.

Builds a random-init Qwen3-MoE with the published router shape (hidden 2048, 128 experts, top-8) but 3 layers and
tiny experts, calibrates its routers to `balanced` on the training conversations (512-token blocks), and prints,
per layer, the held-out max/mean load before and after, and the share of the router input's variance that is
within a block (the rest is between blocks: at random init attention averages a block's tokens together, so deeper
layers see every token of a block nearly alike and route it to the same experts). Variants swap the router
change that runs before moebench's own rank-1 sign fit:

    python devtools/calibration_probe.py rank1          # moebench's method alone
    python devtools/calibration_probe.py whiten         # router weights on whitened inputs (1 % ridge)
    python devtools/calibration_probe.py project 64     # the top-64 principal directions projected out
    python devtools/calibration_probe.py within         # whitened by the within-block covariance, block means out
    python devtools/calibration_probe.py perblock 200   # Adam on the full router, a Switch load loss per block

Each run takes about a minute on 2 cores. Seen 2026-12-02: held-out max/mean after calibration 1.5, 3.7, 4.9
(layers 0-2) with rank1, and no variant brought layers 1-2 below about 2.8 (perblock, 200 steps: 1.62, 3.75, 3.74);
within-block variance share 0.90, 0.41, 0.26. Not a test: its numbers are CPU probes of a 3-layer model, not results.
"""
import logging
import sys
import time

import torch

sys.path.insert(0, "scripts")
from moebench import config as cfgmod, data, models, router_calibration as rc  # noqa: E402

SEQ = 512
_rank1 = rc.fit_weight
share: dict[int, float] = {}


def _reweight(router, x, mode: str, arg: float) -> None:
    xs, w0 = x.float(), router.weight.detach().float()
    xb = xs.reshape(-1, SEQ, xs.shape[-1])
    means = xb.mean(1)
    within = (xb - means[:, None]).reshape(-1, xs.shape[-1])
    share[len(share)] = float(within.pow(2).sum() / (xs - xs.mean(0)).pow(2).sum())
    if mode == "rank1":
        return
    if mode == "perblock":
        return _perblock(router, xb, int(arg) or 200)
    src = within if mode == "within" else xs - xs.mean(0)
    val, vec = torch.linalg.eigh(src.T @ src / src.shape[0])
    if mode == "project":
        u = vec[:, -int(arg):]
        a = w0 - (w0 @ u) @ u.T
    else:
        val = val.clamp_min(0) + 0.01 * val.mean()
        a = w0 @ vec @ torch.diag(val.rsqrt()) @ vec.T
        if mode == "within":
            q, _ = torch.linalg.qr(means.T)
            a = a @ (torch.eye(xs.shape[1]) - q @ q.T)
    with torch.no_grad():  # same logit spread as before: the softmax temperature stays
        router.weight.copy_(float((xs @ w0.T).std() / (xs @ a.T).std()) * a)


def _perblock(router, xb, steps: int, lr: float = 1e-3, top_k: int = 8) -> None:
    """Adam on the whole router weight against a Switch-style load loss computed per block (each block balanced
    on its own, not only the calibration set as a whole)."""
    w = router.weight.detach().float().clone().requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            logits = xb @ w.T
            routed = torch.zeros_like(logits).scatter_(-1, logits.topk(top_k, -1).indices, 1.0).mean(1) / top_k
            loss = w.shape[0] * (routed * logits.softmax(-1).mean(1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        router.weight.copy_(w.detach())


def main(mode: str = "rank1", arg: float = 0.0) -> None:
    logging.basicConfig(level=logging.WARNING)
    fam = cfgmod.load_yaml("models.yaml")["qwen3-30b-a3b"]
    tok = models.train_tokenizer(data.corpus_text(60, 42), 1024)
    train, held = data.split(data.conversations(300, 42), 0.1, 42)
    cal, ev = models._token_blocks(tok, train, SEQ, 8192), models._token_blocks(tok, held, SEQ, 4096)
    cfg = models.model_config(fam, "tiny")
    cfg.architectures = [fam["model_class"]]
    cfg.update(dict(vocab_size=1024, hidden_size=2048, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=32,
                    num_hidden_layers=3, num_attention_heads=16, num_key_value_heads=4, head_dim=64))
    model = models.random_init(cfg, 42, dtype="float32")

    def fit(router, x, shares, top_k):
        _reweight(router, x, mode, arg)
        return _rank1(router, x, shares, top_k)

    rc.fit_weight = fit
    t0 = time.time()
    rec = rc.calibrate(model, cal, ev, "balanced", 42, logging.getLogger("probe"))
    print(f"{mode} {arg or ''}: uniform floor {rec['uniform_floor']:.2f}, {time.time() - t0:.0f} s")
    for layer, v in rec["layers"].items():
        print(f"  layer {layer}: held-out max/mean {v['before']['max_over_mean']:.2f} -> {v['after']['max_over_mean']:.2f}"
              f" (unused {v['after']['unused']}), within-block variance share {share[int(layer)]:.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "rank1", float(sys.argv[2]) if len(sys.argv) > 2 else 0.0)
