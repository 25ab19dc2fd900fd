"""The dtype census decides whether experts really are 4-bit: biases stay float by design and must not count."""
import torch

from moebench import inspect as I


class Params4bit(torch.nn.Parameter):  # named like bitsandbytes' class; storage() reads the name and quant_state
    pass


class QS:
    quant_type = "nf4"


def _model(expert_weight_4bit: bool, bias_numel: int = 2_000_000):
    m = torch.nn.Module()
    experts = torch.nn.Module()
    if expert_weight_4bit:
        w = Params4bit(torch.zeros(8_000_000, dtype=torch.uint8), requires_grad=False)
        w.quant_state = QS()
    else:
        w = torch.nn.Parameter(torch.zeros(4_000_000, dtype=torch.bfloat16), requires_grad=False)
    experts.register_parameter("gate_up_proj", w)
    experts.register_parameter("gate_up_proj_bias", torch.nn.Parameter(torch.zeros(bias_numel, dtype=torch.bfloat16)))
    m.add_module("mlp", torch.nn.Module())
    m.mlp.add_module("experts", experts)
    return m


def test_large_float_biases_do_not_make_4bit_experts_look_float():
    c = I.census(_model(True))  # GPT-OSS's nf4 layout keeps 6.6M float bias values: still 4-bit experts
    assert c["experts_4bit"] and c["expert_float_bytes"] == 0 and c["expert_4bit_bytes"] == 8_000_000


def test_float_expert_weights_are_not_4bit():
    c = I.census(_model(False))
    assert not c["experts_4bit"] and c["expert_float_bytes"] == 8_000_000
