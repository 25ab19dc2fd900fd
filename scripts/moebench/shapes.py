"""A models.yaml entry at a scale (tiny/small/half/full) as its transformers config: shared by the model build,
the FLOP model's table and the tests (no weights, no tokenizer)."""
from __future__ import annotations


def model_config(spec: dict, scale: str, num_hidden_layers: int | None = None):
    """The transformers config for `scale` (tiny/small/full) of a models.yaml entry."""
    import transformers

    shape = dict(spec[scale])
    if num_hidden_layers:
        shape["num_hidden_layers"] = num_hidden_layers
    n = shape["num_hidden_layers"]
    if spec.get("family") == "gpt_oss":  # alternates sliding-window and full attention, starting with sliding
        shape["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    cls = getattr(transformers, spec["config_class"])
    return cls(**shape)
