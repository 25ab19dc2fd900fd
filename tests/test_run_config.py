"""A run's config.yaml is rewritten when it is not the text its config gives, also where Snakemake kept no
records (a fresh clone or a lent GPU host re-running a committed run): sitting 3 of h200-gptoss20b-tier read
sitting 2's config because only the digest param, which needs those records, could tell."""
import os

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
