"""Verify a job's inputs against the hashes recorded when they were made, before the job uses them.

    python -m moebench.inputs verify --data results/<run>/data/train.jsonl --model results/<run>/model
    python -m moebench.inputs fingerprint --model results/<run>/model          (rule model, after the build)

Data files are checked byte for byte against data/data.sha256 (and must be whole JSON lines): a file truncated at a
line boundary or cut mid-line stops the job with a message naming it, instead of training on part of the data or
failing later inside an arm. A model directory is checked against model.sha256 (every file's size, config and
tokenizer hashes, the full weight hashes models.py records for small models) and against a cheap fingerprint for
multi-GB weights, <model>.fingerprint.json: each file's size, its safetensors header's sha256 and the sha256 of
chunks sampled at fixed offsets (a few MB read, not 40 GB); every safetensors file must also end exactly where its
header says. A pre-quantized checkpoint is checked against the files its check.json recorded (quantcheck.files).
A mismatch exits 1 naming the file, what was recorded and how to rebuild it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

from .io import atomic_write, read_json, sha256_file

SAMPLES, CHUNK = 8, 1 << 16  # chunks sampled per weight file, and their size
SMALL = 4 << 20  # files below this are hashed whole


class InputError(Exception):
    """An input differs from what was recorded: the message names the file and the fix."""


# ---- data ----------------------------------------------------------------------------------------------------
def recorded_data(sha_file: Path) -> dict[str, str]:
    out = {}
    for line in sha_file.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            out[parts[1].lstrip("*")] = parts[0]
    return out


def _json_lines(path: Path) -> str | None:
    """None when every line is a whole JSON document ending in a newline; else what is wrong, naming the line."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        whole = data.count(b"\n")
        return f"its last line ends without a newline (cut mid-line after {whole} whole lines)"
    for i, line in enumerate(data.splitlines(), 1):
        try:
            json.loads(line)
        except ValueError as exc:
            return f"line {i} is not a whole JSON document ({exc})"
    return None


def verify_data(path: str | Path) -> str:
    """A data file against data.sha256 beside it; returns its sha256."""
    path = Path(path)
    sha_file = path.parent / "data.sha256"
    fix = f"rebuild it: snakemake --forcerun data (or delete {path.parent}/ and rerun)"
    if not sha_file.is_file():
        raise InputError(f"{path}: no {sha_file} records its hash, so it cannot be checked; {fix}")
    want = recorded_data(sha_file).get(path.name)
    if want is None:
        raise InputError(f"{path}: {sha_file} has no line for {path.name}; {fix}")
    if not path.is_file():
        raise InputError(f"{path} is missing; {fix}")
    got = sha256_file(path)
    if got != want:
        lines = path.read_bytes().count(b"\n")
        broken = _json_lines(path)
        raise InputError(f"{path} is not the file rule data wrote: sha256 {got[:16]}, {sha_file} records "
                         f"{want[:16]} (now {lines} lines{'; ' + broken if broken else ''}): it was truncated or edited; "
                         f"{fix}")
    return got


# ---- model fingerprint ----------------------------------------------------------------------------------------
def _safetensors_header(f) -> tuple[int, bytes]:
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError("shorter than its 8-byte header length")
    n = struct.unpack("<Q", raw)[0]
    if n > 100 << 20:
        raise ValueError(f"header length {n} is implausible")
    header = f.read(n)
    if len(header) < n:
        raise ValueError("cut inside its header")
    return n, header


def safetensors_problem(path: Path) -> str | None:
    """None when the file's header parses and its tensors end exactly at the end of the file."""
    try:
        with open(path, "rb") as f:
            n, header = _safetensors_header(f)
        meta = json.loads(header)
    except (OSError, ValueError) as exc:
        return f"not a readable safetensors file ({exc})"
    end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    size = path.stat().st_size
    if 8 + n + end != size:
        return f"its header says the tensors end at byte {8 + n + end}, the file has {size} bytes"
    return None


def file_fingerprint(path: Path) -> dict:
    """Size plus either the whole file's sha256 (small files) or the sha256 of its head (a safetensors file's whole
    header: every tensor's name, dtype, shape and offsets) and of chunks sampled at evenly spaced offsets."""
    size = path.stat().st_size
    if size < SMALL:
        return {"bytes": size, "sha256": sha256_file(path)}
    samples = hashlib.sha256()
    with open(path, "rb") as f:
        try:
            n = _safetensors_header(f)[0] if path.suffix == ".safetensors" else CHUNK - 8
        except ValueError:
            n = CHUNK - 8
        f.seek(0)
        head = f.read(8 + n)
        for i in range(SAMPLES):
            f.seek((size - CHUNK) * i // (SAMPLES - 1))
            samples.update(f.read(CHUNK))
    return {"bytes": size, "header_sha256": hashlib.sha256(head).hexdigest(), "samples_sha256": samples.hexdigest(),
            "samples": f"{SAMPLES} x {CHUNK} bytes at evenly spaced offsets"}


def fingerprint(model_dir: str | Path) -> dict:
    d = Path(model_dir)
    return {"files": {p.name: file_fingerprint(p) for p in sorted(d.iterdir()) if p.is_file()}}


def fingerprint_path(model_dir: str | Path) -> Path:
    d = Path(model_dir)
    return d.with_name(d.name + ".fingerprint.json")


def _compare(recorded: dict, d: Path, what: str, fix: str) -> None:
    for name, rec in recorded.items():
        p = d / name
        if not p.is_file():
            raise InputError(f"{p} is missing ({what} records it); {fix}")
        size = p.stat().st_size
        want = rec if isinstance(rec, int) else rec.get("bytes")
        if want is not None and size != want:
            raise InputError(f"{p} has {size} bytes, {what} records {want}: it was truncated or replaced; {fix}")
        if isinstance(rec, dict) and len(rec) > 1:
            got = file_fingerprint(p) if "samples_sha256" in rec else {"sha256": sha256_file(p)}
            for key in ("sha256", "header_sha256", "samples_sha256"):
                if key in rec and key in got and got[key] != rec[key]:
                    raise InputError(f"{p}: {key.replace('_', ' ')} {got[key][:16]}, {what} records "
                                     f"{rec[key][:16]}: its content changed; {fix}")


def verify_model(model_dir: str | Path, log=print) -> dict:
    """A model directory against model.sha256 and its fingerprint (made now when the model predates it)."""
    d = Path(model_dir)
    sha_file = d.with_name(d.name + ".sha256")
    fix = f"rebuild it: snakemake --forcerun model (or delete {d}/ and {sha_file})"
    if not sha_file.is_file():
        raise InputError(f"{d}: no {sha_file} records its fingerprint, so it cannot be checked; {fix}")
    rec = read_json(sha_file)
    _compare(rec.get("files") or {}, d, str(sha_file), fix)
    hashed = {"config.json": rec.get("config_sha256"), "tokenizer.json": rec.get("tokenizer_sha256"),
              **(rec.get("weights_sha256") or {})}
    _compare({k: {"sha256": v, "bytes": None} for k, v in hashed.items() if v}, d, str(sha_file), fix)
    for p in sorted(d.glob("*.safetensors")):
        if rec.get("files") and p.name not in rec["files"]:
            raise InputError(f"{p} is not in {sha_file}: a weight file was added after the build; {fix}")
        problem = safetensors_problem(p)
        if problem:
            raise InputError(f"{p}: {problem}; {fix}")
    fp_path = fingerprint_path(d)
    if fp_path.is_file():
        _compare(read_json(fp_path)["files"], d, str(fp_path), fix)
    else:
        atomic_write(fp_path, json.dumps(fingerprint(d), indent=1, sort_keys=True) + "\n")
        log(f"{fp_path} written now (the model was built before fingerprints were): later jobs check against it")
    return {"model_sha256": sha256_file(sha_file), "fingerprint_sha256": sha256_file(fp_path)}


def verify_prequant(check_json: str | Path) -> None:
    """A pre-quantized checkpoint against the files its check recorded (quantcheck.files: sizes, json hashes)."""
    check = Path(check_json)
    rec = read_json(check)
    q = Path(rec.get("q") or str(check).removesuffix(".check.json"))
    fix = f"rebuild it: snakemake --forcerun model_bnb4 (or delete {q}/ and {check})"
    _compare(rec.get("q_files") or {}, q, str(check), fix)
    for p in sorted(q.glob("*.safetensors")):
        problem = safetensors_problem(p)
        if problem:
            raise InputError(f"{p}: {problem}; {fix}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="action", required=True)
    v = sub.add_parser("verify", help="check inputs before a job uses them (exit 1 naming a mismatch)")
    v.add_argument("--data", nargs="*", default=[], help="data files, each checked against data.sha256 beside it")
    v.add_argument("--model", help="model directory, checked against <model>.sha256 and <model>.fingerprint.json")
    v.add_argument("--prequant", nargs="*", default=[], help="a pre-quantized checkpoint's check.json")
    f = sub.add_parser("fingerprint", help="record <model>.fingerprint.json (rule model, after the build)")
    f.add_argument("--model", required=True)
    a = ap.parse_args(argv)
    say = lambda m: print(f"moebench.inputs: {m}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        if a.action == "fingerprint":
            atomic_write(fingerprint_path(a.model), json.dumps(fingerprint(a.model), indent=1, sort_keys=True) + "\n")
            return 0
        for path in a.data:
            verify_data(path)
        if a.model:
            verify_model(a.model, say)
        for check in a.prequant:
            verify_prequant(check)
    except (InputError, OSError, ValueError, KeyError) as exc:
        say(f"STOP: {exc}")
        return 1
    say(f"inputs match their records: {', '.join([*a.data, *([a.model] if a.model else []), *a.prequant])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
