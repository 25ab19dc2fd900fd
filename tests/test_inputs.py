"""Inputs are checked against their recorded hashes before a job uses them (moebench.inputs): a data file truncated at
a line boundary or cut mid-line, a model whose weights were truncated or changed, a pre-quantized checkpoint that
is not what its check recorded: each stops with a message naming the file and the fix; intact inputs pass."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from moebench import inputs  # noqa: E402


def verify(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moebench.inputs", "verify", *args], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT / "scripts"), "PATH": "/usr/bin:/bin"}, timeout=60)


@pytest.fixture
def data(tmp_path) -> Path:
    d = tmp_path / "results" / "r" / "data"
    d.mkdir(parents=True)
    (d / "train.jsonl").write_text("".join(json.dumps({"text": f"conversation {i} " * 5}) + "\n" for i in range(398)))
    (d / "heldout.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
    (d / "data.sha256").write_text("".join(f"{hashlib.sha256((d / n).read_bytes()).hexdigest()}  {n}\n"
                                           for n in ("heldout.jsonl", "train.jsonl")))
    return d


def test_intact_data_passes_and_truncated_data_stops_naming_the_file(data):
    train = data / "train.jsonl"
    r = verify("--data", str(train), str(data / "heldout.jsonl"))
    assert r.returncode == 0, r.stderr
    lines = train.read_text().splitlines(True)
    train.write_text("".join(lines[:100]))  # cut at a line boundary: 100 of 398 sequences, each line whole
    r = verify("--data", str(train))
    assert r.returncode == 1
    assert f"STOP: {train} is not the file rule data wrote" in r.stderr and "(now 100 lines" in r.stderr
    assert "snakemake --forcerun data" in r.stderr
    train.write_text("".join(lines[:100]) + lines[100][:20])  # cut mid-line
    r = verify("--data", str(train))
    assert r.returncode == 1 and "cut mid-line after 100 whole lines" in r.stderr


def _model(d: Path, big: bool) -> Path:
    """A model directory as rule model leaves it: config, tokenizer, one safetensors file, model.sha256 (weights
    hashed only when small, as models.fingerprint does), then the fingerprint rule model records."""
    from safetensors.numpy import save_file
    import numpy as np

    m = d / "model"
    m.mkdir()
    (m / "config.json").write_text('{"hidden_size": 8}')
    (m / "tokenizer.json").write_text('{"model": {}}')
    save_file({"w": np.arange(64 * 1024, dtype=np.float32), "b": np.ones(8, dtype=np.float32)},
              str(m / "model.safetensors"))
    rec = {"config_sha256": hashlib.sha256((m / "config.json").read_bytes()).hexdigest(),
           "tokenizer_sha256": hashlib.sha256((m / "tokenizer.json").read_bytes()).hexdigest(),
           "files": {p.name: p.stat().st_size for p in sorted(m.iterdir())}}
    if not big:
        rec["weights_sha256"] = {"model.safetensors": hashlib.sha256((m / "model.safetensors").read_bytes()).hexdigest()}
    (d / "model.sha256").write_text(json.dumps(rec))
    return m


@pytest.mark.parametrize("big", [False, True], ids=["hashed", "fingerprinted"])
def test_model_weights_changed_or_truncated_stop_naming_the_file(tmp_path, monkeypatch, big):
    if big:  # the multi-GB path: sizes, header and sampled chunks, no full hash
        monkeypatch.setattr(inputs, "SMALL", 1024)
    m = _model(tmp_path, big)
    (tmp_path / "model.fingerprint.json").write_text(json.dumps(inputs.fingerprint(m)))
    assert inputs.verify_model(m)["model_sha256"]
    w = m / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-5] ^= 0xFF  # same size, last chunk changed (the sampled chunks include the file's end)
    w.write_bytes(bytes(raw))
    with pytest.raises(inputs.InputError, match=f"{w}: (sha256|samples sha256) .* its content changed"):
        inputs.verify_model(m)
    w.write_bytes(bytes(raw[:-100]))
    with pytest.raises(inputs.InputError, match=f"{w} has {len(raw) - 100} bytes, .* records {len(raw)}"):
        inputs.verify_model(m)


def test_model_without_fingerprint_gets_one_and_safetensors_end_is_checked(tmp_path):
    m = _model(tmp_path, big=True)
    notes = []
    inputs.verify_model(m, notes.append)
    assert (tmp_path / "model.fingerprint.json").is_file() and "written now" in notes[0]
    w = m / "model.safetensors"
    assert inputs.safetensors_problem(w) is None
    w.write_bytes(w.read_bytes()[:-4])
    assert "the file has" in inputs.safetensors_problem(w)


def test_prequantized_checkpoint_checked_against_its_check(tmp_path):
    q = tmp_path / "model-unsloth-bnb4"
    q.mkdir()
    (q / "config.json").write_text('{"quantization_config": {}}')
    check = tmp_path / "model-unsloth-bnb4.check.json"
    check.write_text(json.dumps({"passed": True, "q": str(q), "q_files": {"config.json": {
        "bytes": (q / "config.json").stat().st_size,
        "sha256": hashlib.sha256((q / "config.json").read_bytes()).hexdigest()}}}))
    assert verify("--prequant", str(check)).returncode == 0
    (q / "config.json").write_text('{"quantization_config": {"x": 1}}')
    r = verify("--prequant", str(check))
    assert r.returncode == 1 and f"{q / 'config.json'} has" in r.stderr and "model_bnb4" in r.stderr
