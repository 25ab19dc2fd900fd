"""The pre-quantized checkpoint check on a tiny GPT-OSS-shaped pair of checkpoints written here: a faithful nf4
copy passes, the negative control fails, and a checkpoint with a scrambled expert or a changed router fails.
(On a GPU the same check reads bitsandbytes' real nf4 tensors: GPU parts run in the campaign.)"""
import pytest
import torch
from safetensors.torch import save_file

from moebench import quantcheck as Q

L, E, H, I, K = 2, 8, 64, 32, 2
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])


def nf4(w: torch.Tensor, block: int = 64) -> torch.Tensor:
    """bitsandbytes' nf4 in plain torch: blockwise absmax over the flattened tensor, nearest of 16 codes."""
    flat = w.float().flatten().view(-1, block)
    scale = flat.abs().amax(dim=1, keepdim=True)
    codes = (flat / scale).unsqueeze(-1).sub(NF4).abs().argmin(-1)
    return (NF4[codes] * scale).view_as(w).to(w.dtype)


def fused(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.02: (torch.randn(*s, generator=g) * std).to(torch.bfloat16)
    t = {}
    for l in range(L):
        p = f"model.layers.{l}.mlp."
        t |= {p + "router.weight": r(E, H), p + "router.bias": r(E),
              p + "experts.gate_up_proj": r(E, H, 2 * I), p + "experts.gate_up_proj_bias": r(E, 2 * I),
              p + "experts.down_proj": r(E, I, H), p + "experts.down_proj_bias": r(E, H)}
    return t


def per_expert(t: dict, quant=nf4, scramble=None, router_shift=0.0) -> dict:
    """Unsloth's layout from the fused one (weights [out, in]); stored dequantized, so `dequant` just reads."""
    out = {}
    for l in range(L):
        p = f"model.layers.{l}.mlp."
        out[p + "router.linear.weight"] = (t[p + "router.weight"].float() + router_shift).to(torch.bfloat16)
        out[p + "router.linear.bias"] = t[p + "router.bias"]
        for e in range(E):
            gu, d = t[p + "experts.gate_up_proj"][e].t(), t[p + "experts.down_proj"][e].t()
            if scramble == (l, e):
                gu = gu.flatten()[torch.randperm(gu.numel())].view_as(gu)
            out[f"{p}experts.gate_up_projs.{e}.weight"] = quant(gu.contiguous())
            out[f"{p}experts.gate_up_projs.{e}.bias"] = t[p + "experts.gate_up_proj_bias"][e].clone()
            out[f"{p}experts.down_projs.{e}.weight"] = quant(d.contiguous())
            out[f"{p}experts.down_projs.{e}.bias"] = t[p + "experts.down_proj_bias"][e].clone()
    return out


def check(tmp_path, q: dict, **kw) -> dict:
    (tmp_path / "bf16").mkdir(exist_ok=True)
    (tmp_path / "q").mkdir(exist_ok=True)
    save_file(fused(), str(tmp_path / "bf16" / "model.safetensors"))
    save_file(q, str(tmp_path / "q" / "model.safetensors"))
    ref = Q.FusedBF16(Q.Tensors(str(tmp_path / "bf16")))
    qq = Q.PerExpert4bit(Q.Tensors(str(tmp_path / "q")), lambda t, k: t[k])
    return Q.run_check(ref, qq, L, H, K, log=lambda m: None, **kw)


def test_expert_formula_is_transformers_gptoss_expert():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    ex = GptOssExperts(GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E))
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.5)  # large enough that the clamps bite
        x = torch.randn(5, H)
        idx = torch.full((5, 1), 3)
        lib = ex(x, idx, torch.ones(5, 1))
        mine = Q.expert_out(x, ex.gate_up_proj[3], ex.gate_up_proj_bias[3], ex.down_proj[3], ex.down_proj_bias[3])
    assert torch.allclose(lib, mine, atol=1e-5)


def test_faithful_nf4_checkpoint_passes_and_the_control_fails(tmp_path):
    res = check(tmp_path, per_expert(fused()))
    assert res["passed"], res["problems"]
    assert all(l["same_router"] and l["same_biases"] for l in res["layers"])
    assert 0.02 < max(l["expert_rel_err_max"] for l in res["layers"]) < Q.EXPERT_RTOL  # nf4 error is real, bounded
    assert res["control_failed_as_it_must"] and res["negative_control"]["expert_rel_err_max"] > 2 * Q.EXPERT_RTOL


@pytest.mark.parametrize("bad", ["scrambled", "router", "unquantized-wrong-expert"])
def test_a_wrong_checkpoint_fails(tmp_path, bad):
    t = fused()
    if bad == "scrambled":
        q = per_expert(t, scramble=(1, 5))
    elif bad == "router":
        q = per_expert(t, router_shift=1e-2)
    else:  # experts shifted by one: every expert holds its neighbour's weights
        q = per_expert(t)
        for l in range(L):
            p = f"model.layers.{l}.mlp.experts.gate_up_projs."
            ws = [q[f"{p}{e}.weight"] for e in range(E)]
            for e in range(E):
                q[f"{p}{e}.weight"] = ws[(e + 1) % E]
    res = check(tmp_path, q)
    assert not res["passed"] and res["problems"]


def test_unsloth_4bit_refuses_a_checkpoint_that_failed_its_check(tmp_path):
    from moebench import arms

    model = tmp_path / "model"
    model.mkdir()
    save_file({"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(2, 2)}, str(model / "model.safetensors"))
    q = tmp_path / "model-unsloth-bnb4"
    q.mkdir()
    save_file({"x": torch.zeros(1)}, str(q / "model.safetensors"))
    arm = arms.get("unsloth_4bit")
    assert arm.refusal(str(model), {}) is None  # a checkpoint on disk and no check record: as before
    (tmp_path / "model-unsloth-bnb4.check.json").write_text('{"passed": false, "problems": ["layer 3: router differs"]}')
    why = arm.refusal(str(model), {})
    assert "failed its check" in why and "router differs" in why
    (tmp_path / "model-unsloth-bnb4.check.json").write_text('{"passed": true, "problems": []}')
    assert arm.refusal(str(model), {}) is None
