"""Training-health gates: pure functions over what a fine-tune recorded, each a pass/fail with the value it rests
on, so a test can build a run that fails each (see validate.py for the fine-tune that records them)."""
from __future__ import annotations

import math
from dataclasses import dataclass

@dataclass
class Gate:
    name: str
    passed: bool
    value: float | None  # the number the gate rests on (None when it could not be computed)
    threshold: float | None
    unit: str
    detail: str


def _finite(x) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def gate_finite(losses: list[float], grad_norms: list[float], eval_losses: list[float],
                nonfinite_grad_steps: int = 0) -> Gate:
    """Value: how many recorded numbers were NaN/Inf (training losses, gradient norms, held-out losses), plus
    the optimizer steps where some trainable tensor's gradient was not finite."""
    bad_loss = [i + 1 for i, v in enumerate(losses) if not _finite(v)]
    bad_grad = [i + 1 for i, v in enumerate(grad_norms) if not _finite(v)]
    bad_eval = [v for v in eval_losses if not _finite(v)]
    n = len(bad_loss) + len(bad_grad) + len(bad_eval) + nonfinite_grad_steps
    if not losses:
        return Gate("finite", False, None, 0, "count", "no training loss was recorded")
    detail = (f"non-finite: loss at steps {bad_loss[:5]}, grad norm at steps {bad_grad[:5]}, "
              f"{len(bad_eval)} held-out losses, {nonfinite_grad_steps} steps with a non-finite tensor gradient"
              if n else f"{len(losses)} losses, {len(grad_norms)} grad norms, {len(eval_losses)} held-out losses, "
                        "all finite")
    return Gate("finite", n == 0, float(n), 0, "count", detail)


def window_means(losses: list[float], window: int) -> tuple[int, float, float]:
    """(w, mean of the first w, mean of the last w), w = min(window, len // 2) so the windows never overlap."""
    w = min(window, len(losses) // 2)
    if w < 1:
        raise ValueError(f"{len(losses)} loss values: need at least 2 to compare a first and a last window")
    return w, sum(losses[:w]) / w, sum(losses[-w:]) / w


def gate_loss_drop(losses: list[float], window: int, min_drop: float) -> Gate:
    """Value: relative fall of the mean training loss, 1 - mean(last w) / mean(first w); strictly positive
    even when min_drop is 0."""
    if len(losses) < 2:
        return Gate("loss_drop", False, None, min_drop, "fraction", f"{len(losses)} loss values; need 2 or more")
    w, first, last = window_means(losses, window)
    if not (_finite(first) and _finite(last)) or first <= 0:
        return Gate("loss_drop", False, None, min_drop, "fraction",
                    f"window means not usable: first {first}, last {last}")
    drop = 1 - last / first
    return Gate("loss_drop", drop > 0 and drop >= min_drop, drop, min_drop, "fraction",
                f"mean loss of the first {w} steps {first:.4f}, of the last {w} {last:.4f}: "
                f"fell {drop:.1%} (needs > 0 and >= {min_drop:.1%})")


def gate_heldout(before: float | None, after: float | None, min_drop: float) -> Gate:
    """Value: relative fall of the held-out loss, 1 - after / before; it must be strictly positive even when
    min_drop is 0 (a loss that stays put did not improve)."""
    if not (_finite(before) and _finite(after)) or before <= 0:
        return Gate("heldout_drop", False, None, min_drop, "fraction", f"held-out loss before {before}, after {after}")
    drop = 1 - after / before
    return Gate("heldout_drop", drop > 0 and drop >= min_drop, drop, min_drop, "fraction",
                f"held-out loss {before:.4f} -> {after:.4f}: fell {drop:.1%} (needs > 0 and >= {min_drop:.1%})")


def gate_expert_grads(layers: dict[int, dict], num_layers: int, min_expert_fraction: float = 1.0) -> Gate:
    """`layers[l]` = {"tensors", "tensors_with_grad", and where the layout maps slices to experts, "experts",
    "experts_with_grad"}. Value: the lowest per-layer fraction of expert LoRA tensors with a gradient."""
    if not layers:
        return Gate("expert_grads", False, 0.0, 1.0, "fraction", "no expert LoRA tensors in the model")
    problems, fractions = [], []
    for l in range(num_layers):
        d = layers.get(l)
        if not d or not d.get("tensors"):
            problems.append(f"layer {l}: no expert LoRA tensors")
            fractions.append(0.0)
            continue
        frac = d["tensors_with_grad"] / d["tensors"]
        fractions.append(frac)
        if frac < 1:
            problems.append(f"layer {l}: {d['tensors_with_grad']}/{d['tensors']} expert LoRA tensors got a gradient")
        if d.get("experts"):
            ef = d["experts_with_grad"] / d["experts"]
            if ef < min_expert_fraction:
                problems.append(f"layer {l}: {d['experts_with_grad']}/{d['experts']} experts got a gradient "
                                f"(needs {min_expert_fraction:.0%})")
    worst = min(fractions)
    detail = "; ".join(problems[:6]) if problems else \
        f"every expert LoRA tensor of all {num_layers} layers got a non-zero finite gradient"
    return Gate("expert_grads", not problems, worst, 1.0, "fraction", detail)


def gate_reload(max_abs_diff: float | None, logit_scale: float | None, rtol: float,
                fresh_diff: float | None = None, adapter_diff: float | None = 0.0) -> Gate:
    """Value: max |trained - reloaded| / max |trained| over the logits of one batch, both through the model's
    plain forward. When the fresh model's logits (before loading the adapter) are known they must differ by more,
    or the check proves nothing. `adapter_diff`: max |difference| between the adapter tensors of the trained
    model, the saved file and the reloaded model: anything but 0 means the adapter did not round-trip."""
    if not (_finite(max_abs_diff) and _finite(logit_scale)) or logit_scale <= 0:
        return Gate("reload", False, None, rtol, "fraction", f"logit difference not computed ({max_abs_diff})")
    rel = max_abs_diff / logit_scale
    ok, detail = rel <= rtol, f"max |logit diff| {max_abs_diff:.3g} = {rel:.2e} of max |logit| {logit_scale:.3g}"
    if fresh_diff is not None:
        detail += f"; before loading the adapter it was {fresh_diff:.3g}"
        if not fresh_diff > max_abs_diff:
            ok, detail = False, detail + ": the adapter made no difference, so the comparison is empty"
    if adapter_diff != 0.0:
        ok, detail = False, detail + f"; the adapter tensors did not round-trip exactly (max |diff| {adapter_diff})"
    return Gate("reload", ok, rel, rtol, "fraction", detail)


def judge(gates: list[Gate]) -> bool:
    return bool(gates) and all(g.passed for g in gates)
