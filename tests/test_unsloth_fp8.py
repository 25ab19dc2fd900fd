"""The unsloth_fp8 arm on CPU: where it cannot run it says why (no GPU, no or old torchao, not Hopper, no prebuilt
checkpoint), make-fp8 records why it made nothing, and the census reads the stored dtype inside a torchao-style
tensor subclass rather than the bf16 it reports."""
import json
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import ROOT
from moebench import arms
from moebench.arms import unsloth_fp8 as fp8
from moebench.metrics import read_rows


def test_registered_with_its_own_precision():
    arm = arms.get("unsloth_fp8")
    assert (arm.name, arm.precision, arm.stack) == ("unsloth_fp8", "fp8", "unsloth")
    assert arms.Broken("unsloth_fp8", "x").precision == "fp8"


def test_no_gpu_no_torchao_old_torchao_not_hopper(monkeypatch):
    assert "needs CUDA" in arms.get("unsloth_fp8").unavailable_reason(False)
    monkeypatch.setattr(fp8, "_version", lambda pkg: None)
    assert "'torchao' >= 0.15.0 (not installed)" in fp8.host_reason(True)
    monkeypatch.setattr(fp8, "_version", lambda pkg: "0.14.1")
    assert "found 0.14.1" in fp8.host_reason(True)
    monkeypatch.setattr(fp8, "_version", lambda pkg: "0.17.0")
    assert "this GPU is 8.0" in fp8.host_reason(True, (8, 0))
    assert fp8.host_reason(True, (9, 0)) is None


def test_refuses_without_the_prebuilt_checkpoint(tmp_path):
    arm = arms.get("unsloth_fp8")
    why = arm.refusal(str(tmp_path / "model"), {})
    assert f"make-fp8 {tmp_path / 'model'} {tmp_path / 'model-fp8'}" in why
    (tmp_path / "model-fp8").mkdir()
    (tmp_path / "model-fp8" / fp8.RECORD).write_text(json.dumps({"skipped": "no GPU here"}))
    assert arm.refusal(str(tmp_path / "model"), {}).endswith("was not made: no GPU here")
    (tmp_path / "model-fp8" / fp8.RECORD).write_text(json.dumps({"mode": "row"}))
    (tmp_path / "model-fp8" / "pytorch_model.bin").write_bytes(b"x")
    assert arm.refusal(str(tmp_path / "model"), {}) is None


def test_make_fp8_on_cpu_records_why_it_made_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "moebench.arms.unsloth_fp8", "make-fp8", str(tmp_path / "src"),
                        str(tmp_path / "dst")], capture_output=True, text=True, timeout=120,
                       env={"PYTHONPATH": str(ROOT / "scripts"), "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((tmp_path / "dst" / fp8.RECORD).read_text())
    assert "needs CUDA" in rec["skipped"] and rec["mode"] == "row"
    assert [p.name for p in (tmp_path / "dst").iterdir()] == [fp8.RECORD]


def test_make_fp8_records_a_crash_and_the_arm_refuses_with_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fp8, "_cuda", lambda: (True, (9, 0)))
    monkeypatch.setattr(fp8, "_version", lambda pkg: "0.17.0")

    def boom(src, dst, mode):
        raise RuntimeError("torchao could not quantize model.layers.0\nmore")

    monkeypatch.setattr(fp8, "_quantize", boom)
    rec = fp8.make_fp8_checkpoint(str(tmp_path / "model"), str(tmp_path / "model-fp8"))
    assert rec["failed"] == "RuntimeError: torchao could not quantize model.layers.0"
    assert arms.get("unsloth_fp8").refusal(str(tmp_path / "model"), {}).endswith(
        "was not made: RuntimeError: torchao could not quantize model.layers.0")


class Sub:
    """Stands in for torchao's Float8Tensor: reports bf16, stores float8 codes and a float32 scale."""
    dtype = torch.bfloat16

    def __init__(self, rows, cols):
        self.qdata = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
        self.scale = torch.ones(rows, 1, dtype=torch.float32)

    def __tensor_flatten__(self):
        return ["qdata", "scale"], None

    def numel(self):
        return self.qdata.numel()


def test_census_reads_the_stored_dtype_inside_a_subclass():
    named = [("model.layers.0.self_attn.q_proj.weight", Sub(64, 32)),
             ("model.layers.0.self_attn.k_proj.weight", torch.zeros(16, 32, dtype=torch.bfloat16)),  # not quantized
             ("model.layers.0.mlp.experts.gate_up_proj", torch.zeros(4, 32, 128, dtype=torch.bfloat16)),
             ("model.layers.0.self_attn.q_proj.lora_A.default.weight", torch.zeros(8, 32))]
    assert fp8.storage(named[0][1]) == ("float8_e4m3fn", 64 * 32 + 64 * 4)
    c = fp8.fp8_census(named)
    assert c["by_category"]["attention"]["float8_e4m3fn"]["bytes"] == 64 * 32 + 256
    assert c["fp8_fraction"]["attention"] == pytest.approx(2304 / (2304 + 1024)) and c["fp8_fraction"]["expert"] == 0.0
    assert c["experts_fp8"] is False and "bfloat16" in c["by_category"]["expert"]


def test_bench_writes_a_skipped_row_on_cpu(tmp_path):
    (tmp_path / "tier.json").write_text(json.dumps({"tier": "cpu", "gpu": None, "plan": {"seq_len": 64, "batch": 1}}))
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**cfg, "arms": ["unsloth_fp8"]}))
    out = tmp_path / "draw1" / "metrics.csv"
    r = subprocess.run([sys.executable, "-m", "moebench.bench", "--config", str(tmp_path / "config.yaml"), "--tier",
                        str(tmp_path / "tier.json"), "--model", str(tmp_path / "model"), "--data", "unused.jsonl",
                        "--arm", "unsloth_fp8", "--draw", "1", "--out", str(out), "--log", str(tmp_path / "run.log")],
                       capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT / "scripts"),
                                                                         "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = read_rows(out)
    assert (row.arm, row.precision, row.status) == ("unsloth_fp8", "fp8", "skipped") and "needs CUDA" in row.reason


def _arm_lists(node):
    """Every enum (or `a|b|c:` pattern) in the schema that names arms."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "enum" and isinstance(v, list) and "hf_bf16" in v:
                yield set(v)
            elif k == "pattern" and isinstance(v, str) and "hf_bf16|" in v:
                yield set(v.split("(", 1)[1].split(")", 1)[0].split("|"))
            else:
                yield from _arm_lists(v)
    elif isinstance(node, list):
        for v in node:
            yield from _arm_lists(v)


def test_every_arm_enum_of_the_schema_is_the_registry():
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "config.schema.yaml").read_text())
    lists = list(_arm_lists(schema))
    assert len(lists) >= 5
    for names in lists:
        assert names == set(arms.REGISTRY), f"schema arm list {sorted(names)} != arms.REGISTRY {sorted(arms.REGISTRY)}"
