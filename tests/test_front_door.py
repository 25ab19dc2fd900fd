"""The front door: `make run`'s stale-lock check, config/README.md generated from the schema, the package
installed by pyproject.toml, and a README small enough to read."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from moebench import unlock
from moebench.report import configdoc

ROOT = Path(__file__).resolve().parents[1]


def _locked(root: Path) -> list[Path]:
    d = root / ".snakemake" / "locks"
    d.mkdir(parents=True)
    files = [d / "0.input.lock", d / "0.output.lock"]
    for f in files:
        f.write_text(f"{root}/results/x\n")
    return files


def test_no_lock_is_silent(tmp_path):
    assert unlock.check(tmp_path) == (0, "")


def test_stale_lock_on_local_fs_is_removed_and_said(tmp_path, monkeypatch):
    files = _locked(tmp_path)
    monkeypatch.setattr(unlock, "fs_type", lambda p: "ext4")
    code, msg = unlock.check(tmp_path)
    assert code == 0 and not any(f.exists() for f in files)
    assert "removed a stale Snakemake lock" in msg and "local ext4" in msg


def test_lock_held_by_a_snakemake_here_is_kept(tmp_path, monkeypatch):
    files = _locked(tmp_path)
    monkeypatch.setattr(unlock, "fs_type", lambda p: "ext4")
    # a process whose command line names snakemake, working in this directory
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "snakemake"], cwd=tmp_path)
    try:
        time.sleep(0.3)
        code, msg = unlock.check(tmp_path, ".venv/bin/snakemake")
    finally:
        p.kill()
        p.wait()
    assert code == 1 and all(f.exists() for f in files)
    assert f"pid {p.pid}" in msg
    assert f"cd {tmp_path} && .venv/bin/snakemake --unlock --cores 1" in msg


@pytest.mark.parametrize("fs", ["nfs4", "lustre", ""])
def test_lock_on_a_shared_or_unknown_fs_prints_the_command(tmp_path, monkeypatch, fs):
    files = _locked(tmp_path)
    monkeypatch.setattr(unlock, "fs_type", lambda p: fs)
    code, msg = unlock.check(tmp_path, "snakemake")
    assert code == 1 and all(f.exists() for f in files)
    assert "another host" in msg and "snakemake --unlock --cores 1" in msg


def test_fs_type_reads_the_mount_table():
    assert unlock.fs_type(Path("/")) != ""


def test_config_readme_is_generated_from_the_schema():
    page = ROOT / "config" / "README.md"
    assert page.read_text() == configdoc.render(), "config/README.md is stale: run `make config-doc`"


def test_config_readme_lists_every_schema_key_with_its_default():
    import yaml

    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    text = configdoc.render()
    for key, s in schema["properties"].items():
        assert f"| `{key}` |" in text, key
        for sub, ss in (s.get("properties") or {}).items():
            line = next(l for l in text.splitlines() if l.startswith(f"| `{key}.{sub}` |"))
            if "default" in ss:
                assert configdoc._json(ss["default"]) in line, (key, sub)


def test_config_doc_check_fails_on_an_edited_page(tmp_path):
    page = tmp_path / "README.md"
    page.write_text(configdoc.render().replace("`hf_bf16`", "`hf_bf17`", 1))
    assert configdoc.main(["--check", str(page)]) == 1
    page.write_text(configdoc.render())
    assert configdoc.main(["--check", str(page)]) == 0


def test_moebench_is_an_installed_package():
    """pyproject.toml installs scripts/moebench (make setup: pip install -e .): no sys.path edits needed."""
    from importlib.metadata import distribution

    dist = distribution("moebench")
    assert dist.metadata["Name"] == "moebench"
    code = "import moebench, sys; print(moebench.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True,
                         env={"PATH": "/usr/bin:/bin"}).stdout
    assert Path(out.strip()).parent.parent.name == "scripts"


def test_readme_is_small():
    assert len((ROOT / "README.md").read_bytes()) <= 8 * 1024
