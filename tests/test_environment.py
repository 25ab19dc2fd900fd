"""environment.yml declares the full stack; the pip install README uses must match it exactly."""
import re

import yaml

from conftest import ROOT


def pins(path):
    return {l.strip() for l in (ROOT / path).read_text().splitlines() if l.strip() and not l.startswith("#")}


def test_environment_yml_matches_requirements():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(pip) == pins("requirements.txt") | pins("requirements-gpu.txt")
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][\w.]*", p) for p in pip), "every package pinned exactly"


def test_brief_pins():
    allp = pins("requirements.txt") | pins("requirements-gpu.txt")
    for p in ("unsloth==2026.10.7", "unsloth-zoo==2026.10.7", "bitsandbytes==0.50.2", "snakemake==9.27.1",
              "snakemake-executor-plugin-slurm==2.8.0", "opentimestamps-client==0.7.2", "experts4bit-qlora==0.58.1",
              "transformers==5.17.0", "trl==1.15.0", "datasets==4.8.5"):
        assert p in allp


def test_readme_commands_are_the_makefile_targets():
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
