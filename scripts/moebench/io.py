"""Small file helpers shared by every stage: atomic writes, JSON, hashing, a run logger."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def atomic_write(path: str | os.PathLike, text: str) -> Path:
    """Write via a temp file and rename, so a killed job never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
    return path


def run_bounded(cmd: list[str], timeout: float, cwd=None, env=None) -> tuple[int | None, str]:
    """Run `cmd` in its own process group and SIGKILL the whole group past `timeout` (a hung child, or one that
    ignores SIGTERM, must not outlive the limit). Returns (exit code, or None when killed; stdout+stderr)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out or ""


def shorten(text: str, n: int = 240) -> str:
    """`text` cut at a word boundary to at most n characters (plus an ellipsis) for one-line reasons."""
    return text if len(text) <= n else text[:n].rsplit(" ", 1)[0] + " …"


def write_json(path, obj) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path):
    return json.loads(Path(path).read_text())


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def package_versions(names) -> dict:
    """Installed version of each distribution (None where it is not installed)."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def logger(name: str, log_path: str | None = None) -> logging.Logger:
    """Log to stderr (Snakemake shows it) and, when given, to the rule's log file."""
    log = logging.getLogger(name)
    log.setLevel(logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s")
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    for h in handlers:
        h.setFormatter(fmt)
        log.addHandler(h)
    return log
