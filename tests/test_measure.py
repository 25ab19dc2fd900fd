"""The measuring rules on CPU: MFU and HFU by hand, the steady warm-up, the timed window's floor and cap, and
steps.csv (what the aggregate's hierarchical bootstrap reads)."""
import csv

import pytest

from moebench import measure


def tiny_fm(**change):
    """A shape whose attention width (heads * head_dim = 3 * 4 = 12) differs from hidden (8), so a q/o
    projection sized hidden x hidden would show."""
    shape = dict(layers=2, hidden=8, inter=4, experts=4, top_k=2, heads=3, kv_heads=1, head_dim=4, vocab=10,
                 window=0, sliding_layers=0, lora_r=1, lora_experts=True)
    return measure.FlopModel(**{**shape, **change})


def test_o_proj_is_attention_width_by_hidden():
    fm = tiny_fm()
    q, kv = 3 * 4, 1 * 4
    # q: 8x12, k and v: 8x4 each, o: 12x8 (not 8x8)
    assert fm.attn_params() == 8 * q + 2 * 8 * kv + q * 8 == 256
    # LoRA r=1: r*(in+out) per adapted matrix; o_proj's in is 12
    attn_lora = (8 + q) + 2 * (8 + kv) + (q + 8)
    expert_lora = 2 * ((8 + 2 * 4) + (4 + 8))
    assert fm.lora_active_params() == 2 * (attn_lora + expert_lora)


def test_mfu_and_hfu_by_hand():
    fm, seq = tiny_fm(), 6
    layer = 256 + 2 * (8 * 8 + 4 * 8) + 8 * 4  # attention, top-2 experts (gate_up 8x8, down 4x8), router 8x4
    assert fm.layer_active_params() == 2 * layer == 960
    P = 2 * layer + 8 * 10  # + lm_head
    L = 2 * ((8 + 12) + 2 * (8 + 4) + (12 + 8) + 2 * ((8 + 8) + (4 + 8)))
    attn = 4 * 3 * 4 * 2 * (seq / 2)  # 4 * heads * head_dim per layer at mean context seq/2, two full layers
    model = (2 * P + 2 * L + attn) + (2 * P + 4 * L + 2 * attn)
    hardware = model + (2 * 2 * layer + 2 * L + attn)  # decoder layers' forward again; not the LM head
    assert fm.flops_per_token(seq, recompute=False) == model == 4 * P + 6 * L + 3 * attn
    assert fm.flops_per_token(seq, recompute=True) == hardware
    tokens = 2 * seq
    u = measure.utilization(fm.step_flops(tokens, seq, False), fm.step_flops(tokens, seq, True), step_s=1e-9,
                            peak_tflops=100.0)
    assert u["mfu"] == pytest.approx(tokens * model / 1e-9 / 1e14)
    assert u["hfu"] == pytest.approx(tokens * hardware / 1e-9 / 1e14)
    assert u["hfu"] > u["mfu"]
    with pytest.raises(ValueError, match="positive step time"):
        measure.utilization(1.0, 1.0, 0.0, 100.0)


def test_recompute_leaves_the_lm_head_out():
    """A bigger vocabulary adds the same FLOPs with and without recompute: the head is not recomputed."""
    small, big = tiny_fm(vocab=10), tiny_fm(vocab=1000)
    d_model = big.flops_per_token(8, False) - small.flops_per_token(8, False)
    d_hw = big.flops_per_token(8, True) - small.flops_per_token(8, True)
    assert d_model == d_hw == 4 * 8 * 990


def test_gflop_table_names_every_model():
    table = measure.flops_table(seq=4096, lora_r=64)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "GFLOP" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["gpt-oss-20b", "qwen3-30b-a3b", "olmoe-1b-7b"]
    from moebench import config as cfgmod, shapes

    g = measure.gflop_per_token(shapes.model_config(cfgmod.load_yaml("models.yaml")["gpt-oss-20b"], "full"),
                                4096, 64)
    assert 3.0 < g["active_params_b"] < 4.5  # gpt-oss-20b: 3.6B active (+ LoRA); 4P frozen
    assert 4 * 3.0 < g["model_gflop_per_token"] < g["hardware_gflop_per_token"]


# ---- steady warm-up
def warm(policy, step_times):
    """Run the warm-up rule over scripted step times; returns the times it took."""
    times, it = [], iter(step_times)
    while policy.more(times):
        times.append(next(it))
    return times


def test_warmup_runs_until_the_last_k_steps_are_steady():
    p = measure.WarmupPolicy(min_steps=2, max_steps=20, k=3, tol=0.05)
    times = warm(p, [60.0, 5.0, 2.0, 1.2, 1.0, 1.01, 1.02, 1.0, 9.0])
    assert times == [60.0, 5.0, 2.0, 1.2, 1.0, 1.01, 1.02]  # 1.0, 1.01, 1.02 vary 2% < 5%
    assert p.outcome(times) == (True, "")


def test_warmup_stops_at_its_cap_and_says_why():
    p = measure.WarmupPolicy(min_steps=1, max_steps=4, k=2, tol=0.05)
    times = warm(p, [5.0, 1.0, 2.0, 1.0, 1.0, 1.0])
    assert len(times) == 4
    steady, why = p.outcome(times)
    assert not steady and "not steady after warmup_max=4" in why and "varied 66.7%" in why


def test_warmup_keeps_its_minimum_even_when_steady():
    p = measure.WarmupPolicy(min_steps=5, max_steps=9, k=2, tol=0.5)
    assert len(warm(p, [1.0] * 9)) == 5


def test_warmup_policy_from_plan():
    p = measure.WarmupPolicy.from_plan({"warmup_steps": 3, "warmup_max": 30, "steady_k": 4, "steady_tol": 0.1})
    assert (p.min_steps, p.max_steps, p.k, p.tol) == (3, 30, 4, 0.1)
    old = measure.WarmupPolicy.from_plan({"warmup_steps": 3})  # a tier.json from before these keys
    assert (old.min_steps, old.max_steps) == (3, 3)
    assert measure.WarmupPolicy.from_plan({"warmup_steps": 5, "warmup_max": 2}).max_steps == 5
    with pytest.raises(ValueError, match="steady_k"):
        measure.WarmupPolicy.from_plan({"warmup_steps": 1, "steady_k": 1})


# ---- the timed window
def window(policy, step_s, samples_per_s=None):
    """Steps of step_s seconds until the policy stops; returns (steps, elapsed, samples)."""
    n, t = 0, 0.0
    samples = None if samples_per_s is None else 0
    while not policy.done(n, t, samples):
        n, t = n + 1, t + step_s
        if samples is not None:
            samples = int(t * samples_per_s)
    return n, t, samples


def test_window_is_the_larger_of_steps_and_seconds():
    p = measure.WindowPolicy(steps=20, min_s=30.0, min_samples=60)
    assert window(p, 0.5, samples_per_s=15)[0] == 60  # 30 s at 0.5 s/step
    assert window(p, 5.0, samples_per_s=15)[0] == 20  # 20 steps already take 100 s
    assert p.shortfall(*window(p, 0.5, samples_per_s=15)) == ""


def test_window_waits_for_power_samples_but_not_forever():
    p = measure.WindowPolicy(steps=2, min_s=0.0, min_samples=60)
    n, t, s = window(p, 0.5, samples_per_s=10)
    assert s >= 60 and n == 12
    n, t, s = window(p, 1.0, samples_per_s=0)  # a sensor that never answers
    assert t >= 60 and "power samples stalled" in p.shortfall(n, t, s)
    assert window(p, 0.5)[0] == 2  # no meter: the sample floor does not apply


def test_capped_window_says_it_is_short():
    plan = {"timed_steps": 20, "min_timed_s": 30, "min_power_samples": 60, "max_timed_steps": 100,
            "arm_max_timed_steps": {"slow_arm": 10}}
    p = measure.WindowPolicy.from_plan(plan, "fast_arm")
    n, t, s = window(p, 0.1, samples_per_s=15)
    assert n == 100
    assert p.shortfall(n, t, s).startswith("window short: ") and "of min_timed_s=30" in p.shortfall(n, t, s)
    assert "capped by max_timed_steps=100" in p.shortfall(n, t, s)
    slow = measure.WindowPolicy.from_plan(plan, "slow_arm")
    n, t, s = window(slow, 1.0, samples_per_s=15)
    assert n == 10 and "10 of timed_steps=20 steps" in slow.shortfall(n, t, s)
    cpu = measure.WindowPolicy.from_plan({"timed_steps": 3, "min_timed_s": 0})
    assert window(cpu, 0.01)[0] == 3 and cpu.max_steps is None


def test_steps_csv(tmp_path):
    p = measure.write_steps(tmp_path / "d" / "steps.csv", [0.5, 0.25, 0.125], tokens_per_step=8192)
    with open(p) as fh:
        recs = list(csv.DictReader(fh))
    assert list(recs[0]) == ["step", "seconds", "tokens"]
    assert [(int(r["step"]), float(r["seconds"]), int(r["tokens"])) for r in recs] == [
        (1, 0.5, 8192), (2, 0.25, 8192), (3, 0.125, 8192)]


def test_flops_table_cli(capsys):
    measure.main(["--flops-table", "--seq", "1024", "--lora-r", "8", "--model", "olmoe-1b-7b"])
    out = capsys.readouterr().out
    assert "| olmoe-1b-7b |" in out and "seq_len 1024, LoRA r 8" in out


# ---- router load counted on the device, over a window, with its drift
class TinyMoE:
    """Two decoder layers whose routers (mlp.gate) return logits, as Qwen3-MoE's and OLMoE's do."""

    def __new__(cls, experts=4):
        import torch

        class Layer(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.mlp = torch.nn.Module()
                self.mlp.gate = torch.nn.Linear(3, experts, bias=False)

            def forward(self, x):
                self.mlp.gate(x)
                return x

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = torch.nn.ModuleList([Layer(), Layer()])

            def forward(self, x):
                for layer in self.layers:
                    x = layer(x)
                return x

        return Model()


def steer(model, expert):
    """Make every layer's router pick `expert` first (and the next one second) for positive inputs."""
    import torch

    with torch.no_grad():
        for layer in model.layers:
            w = torch.zeros_like(layer.mlp.gate.weight)
            w[expert] = 2.0
            w[(expert + 1) % w.shape[0]] = 1.0
            layer.mlp.gate.weight.copy_(w)


def test_router_load_counts_a_window_and_its_drift():
    import torch

    from moebench import routing

    model, x = TinyMoE(), torch.ones(5, 3)  # 5 tokens a step
    load = routing.RouterLoad(model, num_experts=4, top_k=2)
    load.counting = True
    steer(model, 0)
    model(x)  # a warm-up step: counted, but before the window
    load.mark()
    for step in range(8):  # the timed window: routing moves from experts 0/1 to 2/3 halfway
        steer(model, 0 if step < 4 else 2)
        model(x)
        load.mark()
    assert load.counts() == {0: [25, 25, 20, 20], 1: [25, 25, 20, 20]}  # everything, warm-up included
    assert load.window() == {0: [20, 20, 20, 20], 1: [20, 20, 20, 20]}  # the 8 window steps only
    assert load.window(0, 2) == {0: [10, 10, 0, 0], 1: [10, 10, 0, 0]}  # the first quarter: steps 1-2
    d = load.drift()
    assert d["quarter_steps"] == 2 and d["tv"] == pytest.approx(1.0)  # disjoint experts
    assert d["max_over_mean_first"] == d["max_over_mean_last"] == pytest.approx(2.0)
    whole = load.overall(load.window())
    assert whole["max_over_mean"] == 1.0 and whole["unused"] == 0 and whole["entropy_norm"] == pytest.approx(1.0)
    assert all(m.dtype == torch.long and m.shape == (2, 4) for m in load.marks)
    load.remove()
    model(x)
    assert load.counts()[0] == [25, 25, 20, 20]  # hooks gone


def test_router_load_without_drift_or_routers():
    import torch

    from moebench import routing

    model = TinyMoE()
    load = routing.RouterLoad(model, num_experts=4, top_k=2)
    assert load.drift() == {} and load.window() == {}
    load.mark()
    model(torch.ones(2, 3))  # counting off: nothing counted
    load.mark()
    assert load.window() == {} and load.overall() == {} and load.drift() == {}
    none = routing.RouterLoad(torch.nn.Linear(2, 2), num_experts=4, top_k=2)
    none.mark()
    assert none.marks == [] and none.window() == {}
    assert routing.load_drift({0: [1, 1]}, {0: [1, 1]})["tv"] == 0.0


def test_frozen_timed_window_does_the_work_but_moves_no_weight():
    import torch

    from moebench import harness

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x = torch.randn(8, 4)
    layer(x).pow(2).sum().backward()
    opt.step()  # a trained step: the weights move
    before = [p.detach().clone() for p in layer.parameters()]
    harness.freeze(opt)
    for _ in range(3):
        opt.zero_grad()
        layer(x).pow(2).sum().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    assert opt.state[layer.weight]["step"] == 4  # AdamW still ran every update


def test_flop_rows_label_mfu_and_hfu_and_the_4bit_basis(monkeypatch):
    """The GPU rows without a GPU: the matmul rate is stubbed, the arithmetic and the labels are bench's."""
    from types import SimpleNamespace

    from transformers import Qwen3MoeConfig

    from moebench import bench, harness

    cfg = Qwen3MoeConfig(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, hidden_size=8,
                         moe_intermediate_size=4, intermediate_size=16, num_attention_heads=3, num_key_value_heads=1,
                         head_dim=4, vocab_size=10)
    model = SimpleNamespace(config=cfg)
    monkeypatch.setattr(measure, "matmul_tflops", lambda: 500.0)
    plan = {"seq_len": 6, "batch": 2, "gradient_checkpointing": "unsloth", "datasheet_bf16_tflops": 1000}
    fm = tiny_fm()  # the same shape, written out
    rows = {}
    for precision in ("bf16", "nf4"):
        ctx = harness.Ctx("r", "t", "m", "a", precision, 1, "x.log")
        bench.flop_rows(ctx, model, SimpleNamespace(r=1, experts=True), plan, SimpleNamespace(precision=precision),
                        step_s=1e-9, cuda=True)
        rows[precision] = {r.metric: r for r in ctx.rows}
    got = rows["bf16"]
    model_f, hw_f = fm.step_flops(12, 6, recompute=False), fm.step_flops(12, 6, recompute=True)
    assert got["model_tflop_per_step"].value == pytest.approx(model_f / 1e12)
    assert got["hardware_tflop_per_step"].value == pytest.approx(hw_f / 1e12)
    assert got["mfu_vs_measured_matmul"].value == pytest.approx(model_f / 1e-9 / 1e12 / 500.0)
    assert got["hfu_vs_datasheet"].value == pytest.approx(hw_f / 1e-9 / 1e12 / 1000.0)
    assert got["mfu_vs_datasheet"].unit == "fraction of bf16 peak" and got["mfu_vs_datasheet"].reason == ""
    assert rows["nf4"]["mfu_vs_datasheet"].reason.startswith("nf4 arm: FLOPs against the bf16 peak")
    assert rows["nf4"]["mfu_vs_datasheet"].value == got["mfu_vs_datasheet"].value
