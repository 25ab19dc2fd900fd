"""The recipe's ready-to-paste snippets: the transformers/PEFT ones run on CPU with the tiny model, the Unsloth
ones on a GPU (the lent GPU runs them beside each sitting's model build: devtools/lent_gpu_queue.sh GPU_TESTS);
every template renders and compiles."""
import ast
import importlib.util
import os
import shutil
import sys

import pytest

from conftest import ROOT, SLACK_NICE, background, process, tiny_workdir
from moebench import recipe

CFG = {"lora": {"r": 4, "alpha": 8, "attention": ["q_proj", "v_proj"], "experts": True}}
PLAN = {"moe_backend": "grouped_mm", "unsloth_env": {"UNSLOTH_BLOCK_MOE": "outside"}}


def setting(arm, mode="none", batch=1, seq=32):
    return {"arm": arm, "precision": "bf16", "batch": batch, "seq_len": seq, "mode": mode}


@pytest.mark.parametrize("arm,mode,kind", [
    ("hf_bf16", "none", "hf_peft"), ("hf_bnb4", "plain", "hf_peft"), ("hf_bf16", "expert_offload", "hf_peft_offload"),
    ("unsloth_bf16", "unsloth", "unsloth_trl"), ("unsloth_4bit", "unsloth", "unsloth_trl"),
    ("unsloth_fp8", "unsloth", "unsloth_trl"), ("e4b_4bit", "plain", "e4b")])
def test_every_snippet_renders_valid_python_with_its_settings(arm, mode, kind):
    s = setting(arm, mode, batch=2, seq=4096)
    assert recipe.snippet_kind(s) == kind
    code = recipe.render_snippet(s, CFG, PLAN)
    ast.parse(code)
    assert "SEQ_LEN, BATCH, MAX_STEPS = 4096, 2, 100" in code and ("r=4" in code or "r, alpha = 4, 8" in code)
    if kind == "unsloth_trl":
        assert {"unsloth_bf16": "load_in_16bit=True", "unsloth_4bit": "load_in_4bit=True",
                "unsloth_fp8": "load_in_fp8=True"}[arm] in code
        assert 'use_gradient_checkpointing="unsloth"' in code and "UNSLOTH_BLOCK_MOE" in code
    if kind == "hf_peft_offload":
        assert "moebench's own expert offload" in code and "ExpertOffloader" in code
    if arm == "hf_bnb4":
        assert "BitsAndBytesConfig(load_in_4bit=True" in code and "gradient_checkpointing=True" in code


MODES = ["none", "expert_offload"]
# Both snippets run as scripts (runpy, run_name "__main__", fresh globals each) in one interpreter: a second
# process would only pay torch/transformers/peft's imports again (~7 CPU-s). Each script's own outcome is kept.
RUNNER = """import runpy, sys, traceback
for path in sys.argv[1:]:
    print("=== start", path, flush=True)
    try:
        runpy.run_path(path, run_name="__main__")
        print("=== passed", path, flush=True)
    except BaseException:
        traceback.print_exc()
        print("=== failed", path, flush=True)
"""


@background("trained")
def trained(tmp_path_factory):
    """mode -> (its directory, the runner's whole output): every snippet rendered and run once, on a tiny workdir,
    beside the unit tests (the runner at SLACK_NICE)."""
    tiny = tmp_path_factory.mktemp("tiny")
    tiny_workdir(tiny, conversations=12)
    runs = {}
    for mode in MODES:
        d = tmp_path_factory.mktemp(mode)
        code = recipe.render_snippet(setting("hf_bf16", mode), CFG, PLAN, model=str(tiny / "model"),
                                     data=str(tiny / "data" / "train.jsonl"), out=str(d / "out"), max_steps=2)
        (d / "train.py").write_text(code)
        runs[mode] = d
    env = {**os.environ, "PYTHONPATH": str(ROOT / "scripts"), "CUDA_VISIBLE_DEVICES": ""}
    r = process([sys.executable, "-c", RUNNER, *(str(d / "train.py") for d in runs.values())],
                tmp_path_factory.mktemp("run"), timeout=900, env=env, nice=SLACK_NICE)
    return {mode: (d, r.out) for mode, d in runs.items()}


@pytest.mark.parametrize("mode", MODES)
def test_transformers_snippet_trains_the_tiny_model_on_cpu(trained, mode):
    d, out = trained[mode]
    assert f"=== passed {d / 'train.py'}" in out, out[-5000:]
    assert (d / "out" / "adapter_config.json").exists()


GPU = pytest.mark.skipif(not (shutil.which("nvidia-smi") and importlib.util.find_spec("unsloth")),
                         reason="needs a CUDA GPU and unsloth: runs on the lent GPU (lent_gpu_queue.sh GPU_TESTS)")


@GPU
@pytest.mark.parametrize("arm,model", [("unsloth_bf16", "gpt-oss-20b"), ("unsloth_4bit", "qwen3-30b-a3b")])
def test_unsloth_snippet_trains_a_tiny_model_on_gpu(tmp_path, arm, model):
    """The Unsloth + TRL snippet as a user pastes it, in its own process: two steps on a tiny model, adapter saved,
    and no fallback Unsloth announces (its autotune or per-layer compile failing)."""
    tiny_workdir(tmp_path, model, conversations=12)
    code = recipe.render_snippet(setting(arm, "unsloth", seq=64), CFG, {"moe_backend": "grouped_mm"},
                                 model=str(tmp_path / "model"), data=str(tmp_path / "data" / "train.jsonl"),
                                 out=str(tmp_path / "out"), max_steps=2)
    (tmp_path / "train.py").write_text(code)
    r = process([sys.executable, str(tmp_path / "train.py")], tmp_path, timeout=900,
                env={**os.environ, "PYTHONPATH": str(ROOT / "scripts")})
    assert r.returncode == 0, r.out[-5000:]
    assert (tmp_path / "out" / "adapter_config.json").exists()
    assert "auto-tuning failed" not in r.out and "compile failed" not in r.out, r.out[-5000:]
