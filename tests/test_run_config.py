"""A run's config.yaml is rewritten when it is not the text its config gives, also where Snakemake kept no
records (a fresh clone or a lent GPU host re-running a committed run): sitting 3 of h200-gptoss20b-tier read
sitting 2's config because only the digest param, which needs those records, could tell."""
import os
import shutil

import pytest
from conftest import BACKGROUND_NICE, ROOT, in_background, snakemake

from moebench import workflowlib as wl


def _ancient(path):
    return ("ancient", path)


def test_stale_config_is_dated_back_and_its_input_made_plain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = {"run": "r", "validate": {"arms": ["unsloth_bf16"]}}
    p = tmp_path / "results/r/config.yaml"
    p.parent.mkdir(parents=True)
    p.write_text(wl.config_text({**cfg, "validate": {"arms": []}}))
    fn = wl.stale_config_input({"r": cfg}, _ancient)
    wc = type("W", (), {"run": "r"})()
    assert fn(wc) == "config/config.yaml"  # plain: newer than the output, so Snakemake reruns the checkpoint
    assert os.stat(p).st_mtime == 86400 and "arms: []" in p.read_text()  # dated back, content untouched
    p.write_text(wl.config_text(cfg))
    assert fn(wc) == ("ancient", "config/config.yaml")  # the same text: never a reason to rerun
    p.unlink()
    assert fn(wc) == ("ancient", "config/config.yaml")  # missing: Snakemake makes it anyway


# ---- the same on a real Snakemake, started beside the other tests (two Snakemake start-ups cost ~20 s) --------
RUN = "h200-gptoss20b-tier"
_STALE: dict = {}


@in_background("stale_run")
def start_stale_run(tmp_path_factory) -> None:
    """As on a lent GPU host: a committed run whose run config was edited since, no .snakemake records."""
    if _STALE:
        return
    d = tmp_path_factory.mktemp("stale")
    for sub in ("workflow", "config", "scripts/moebench"):
        shutil.copytree(ROOT / sub, d / sub, ignore=shutil.ignore_patterns("__pycache__"))
    (d / "results" / RUN).mkdir(parents=True)
    for f in ("results/%s/config.yaml" % RUN, "results/%s/tier.json" % RUN, "environment.yml"):
        shutil.copy2(ROOT / f, d / f)
    cfg = d / "config/runs" / f"{RUN}.yaml"
    cfg.write_text(cfg.read_text().replace("validate: {arms: [unsloth_bf16, unsloth_4bit]}",
                                           "validate: {arms: [unsloth_bf16, unsloth_4bit], seq_len: 512}"))
    _STALE.update(d=d, proc=snakemake(d, "--configfile", str(cfg.relative_to(d)), "--cores", "1",
                                      f"results/{RUN}/config.yaml", wait=False, nice=BACKGROUND_NICE))


@pytest.fixture(scope="module")
def stale_run(tmp_path_factory):
    start_stale_run(tmp_path_factory)
    _STALE["proc"].wait(timeout=300)
    return _STALE["d"], _STALE["proc"].returncode, (_STALE["d"] / "snakemake.out").read_text()


def test_fresh_clone_rewrites_a_committed_runs_stale_config(stale_run):
    d, rc, out = stale_run
    assert rc == 0 and "Updated input files: config/config.yaml" in out, out[-3000:]
    assert "seq_len: 512" in (d / "results" / RUN / "config.yaml").read_text()
