"""The claims ledger: judging logic on made-up rows (made up only here), the ledger file, the rule's outputs,
and the committed H100 run's ledger resting only on ids its provenance holds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from moebench import claims as cl
from moebench.metrics import Row, write_rows

ROOT = Path(__file__).resolve().parents[1]
H100 = ROOT / "results" / "h100-gptoss20b"
RUN = "fake"


def row(arm, metric, value=None, draw=1, stage="bench", status="measured", reason="", unit="", run=RUN):
    return Row(run, "h100_80gb", "gpt-oss-20b", arm, "bf16", stage, metric, value, unit, None, None, status, reason,
               "log", draw)


def info(**kw):
    base = {"run": RUN, "tier": "h100_80gb", "gpu": "NVIDIA H100 80GB HBM3", "gpu_memory_gb": 79.2,
            "model_scale": "full", "model": "gpt-oss-20b", "tier_json": True}
    return {**base, **kw}


def claim(metric, expect, conditions=None, **kw):
    return cl.check_claim({"id": "c", "text": "t", "source": {"who": "w"}, "metric": metric, "expect": expect,
                           "conditions": conditions or {}, **kw})


def ratio(num_arm, den_arm, metric="step_s", stage="bench"):
    return {"kind": "ratio", "numerator": {"arm": num_arm, "metric": metric, "stage": stage},
            "denominator": {"arm": den_arm, "metric": metric, "stage": stage}}


def steps(arm, *values):
    return [row(arm, "step_s", v, draw=k + 1, unit="s") for k, v in enumerate(values)]


SEED = ratio("unsloth_4bit", "unsloth_bf16")


@pytest.mark.parametrize("slow,verdict", [(11.0, cl.HOLDS), (10.0, cl.HOLDS), (12.0, cl.HOLDS),
                                          (9.0, cl.FAILS), (12.5, cl.FAILS)])
def test_range_claim(slow, verdict):
    c = claim(SEED, {"min": 10, "max": 12})
    out = cl.judge(c, steps("unsloth_4bit", slow, slow) + steps("unsloth_bf16", 1.0, 1.0), info())
    assert out["verdict"] == verdict
    assert out["value"] == pytest.approx(slow)
    assert f"{slow:.4g}" in out["reason"]
    assert len(out["provenance_ids"]) == 4 and f"{RUN}/bench/unsloth_4bit/d1/step_s" in out["provenance_ids"]


def test_conditions_not_matching_is_never_holds():
    """The same rows that make the claim hold on its own tier leave it untestable on another."""
    c = claim(SEED, {"min": 7, "max": 10}, {"tier": ["a100_40gb"]})
    rows = steps("unsloth_4bit", 8.0, 8.0) + steps("unsloth_bf16", 1.0, 1.0)
    assert cl.judge(c, rows, info(tier="a100_40gb"))["verdict"] == cl.HOLDS
    out = cl.judge(c, rows, info(tier="h100_80gb"))
    assert out["verdict"] == cl.UNTESTABLE and out["value"] is None
    assert "a100_40gb" in out["reason"] and "h100_80gb" in out["reason"]


@pytest.mark.parametrize("cond,run_info,word", [
    ({"model": ["qwen3-30b-a3b"], "gpu": ["RTX 5090"]}, info(), "qwen3-30b-a3b"),
    ({"gpu": ["RTX 5090"]}, info(), "RTX 5090"),
    ({"model_scale": ["full"]}, info(model_scale="tiny"), "tiny"),
    ({"tier": ["h100_80gb"]}, info(tier=None, tier_json=False), "tier.json"),
])
def test_other_run_conditions(cond, run_info, word):
    c = claim(ratio("unsloth_4bit", "e4b_4bit"), {"about": 1.92}, cond)
    rows = steps("unsloth_4bit", 1.92) + steps("e4b_4bit", 1.0)
    out = cl.judge(c, rows, run_info)
    assert out["verdict"] == cl.UNTESTABLE and word in out["reason"]
    assert cl.judge(c, rows, info(model="qwen3-30b-a3b", gpu="NVIDIA GeForce RTX 5090", tier="h100_80gb",
                                  model_scale="full"))["verdict"] == cl.HOLDS


def test_about_means_within_tolerance():
    c = claim(ratio("unsloth_4bit", "e4b_4bit"), {"about": 1.92, "tolerance": 0.1})
    assert c["expect"]["min"] == pytest.approx(1.728) and c["expect"]["max"] == pytest.approx(2.112)
    assert cl.judge(c, steps("unsloth_4bit", 2.5) + steps("e4b_4bit", 1.0), info())["verdict"] == cl.FAILS


def test_missing_rows_are_not_testable_with_why():
    c = claim(ratio("unsloth_bf16", "hf_bf16", "max_seq_len", "sweep"), {"min": 5.4},
              when_absent="the capacity sweeps were not run")
    out = cl.judge(c, steps("unsloth_bf16", 1.0) + steps("hf_bf16", 2.0), info())
    assert out["verdict"] == cl.UNTESTABLE and out["value"] is None
    assert "no unsloth_bf16 sweep/max_seq_len rows" in out["reason"] and "sweeps were not run" in out["reason"]


def test_skipped_arm_gives_its_reason_and_ids():
    c = claim(SEED, {"min": 10, "max": 12})
    rows = [row("unsloth_4bit", "step_s", status="skipped", reason="needs a pre-quantized checkpoint", draw=k)
            for k in (1, 2)] + steps("unsloth_bf16", 1.0, 1.0)
    out = cl.judge(c, rows, info())
    assert out["verdict"] == cl.UNTESTABLE and "skipped: needs a pre-quantized checkpoint" in out["reason"]
    assert f"{RUN}/bench/unsloth_4bit/d1/step_s" in out["provenance_ids"]
    # a metric the skipped arm never wrote (its energy) still names why the arm did not run
    e = claim(ratio("unsloth_4bit", "unsloth_bf16", "j_per_token", "energy"), {"min": 1.2})
    out = cl.judge(e, rows + [row("unsloth_bf16", "j_per_token", 0.1, stage="energy")], info())
    assert out["verdict"] == cl.UNTESTABLE and "pre-quantized checkpoint" in out["reason"]


def test_inequality_claims_and_gib():
    vram = claim({"kind": "value", "of": {"arm": "unsloth_4bit", "metric": "peak_reserved_gb"}},
                 {"max": 12.8, "unit": "GiB"})
    under = cl.judge(vram, [row("unsloth_4bit", "peak_reserved_gb", 13.5, unit="GB")], info())
    assert under["verdict"] == cl.HOLDS and under["value"] == pytest.approx(13.5e9 / 2**30)  # 12.57 GiB
    over = cl.judge(vram, [row("unsloth_4bit", "peak_reserved_gb", 14.0, unit="GB")], info())
    assert over["verdict"] == cl.FAILS and over["value"] == pytest.approx(14.0e9 / 2**30)
    bnb = claim({"kind": "value", "of": {"arm": "hf_bnb4", "metric": "expert_weights_4bit_fraction"}}, {"min": 0.5})
    out = cl.judge(bnb, [row("hf_bnb4", "expert_weights_4bit_fraction", 0.0, draw=k) for k in (1, 2)], info())
    assert out["verdict"] == cl.FAILS and out["value"] == 0.0 and "measured 0" in out["reason"]
    less = claim(ratio("unsloth_bf16", "hf_bf16", "peak_alloc_gb"), {"max": 0.65})
    assert cl.judge(less, [row("unsloth_bf16", "peak_alloc_gb", 30.0), row("hf_bf16", "peak_alloc_gb", 60.0)],
                    info())["verdict"] == cl.HOLDS


def test_median_over_draws_and_other_runs_ignored():
    c = claim(ratio("hf_bf16", "unsloth_bf16"), {"min": 1.8})
    rows = steps("hf_bf16", 2.0, 10.0, 2.2) + steps("unsloth_bf16", 1.0, 1.0, 1.0)
    rows.append(row("hf_bf16", "step_s", 99.0, draw=4, run="another-run"))
    out = cl.judge(c, rows, info())
    assert out["value"] == pytest.approx(2.2) and out["verdict"] == cl.HOLDS
    assert not any(i.startswith("another-run/") for i in out["provenance_ids"])


def test_presupposed_rows():
    c = claim(ratio("hf_bf16", "unsloth_bf16"), {"min": 1.8},
              {"rows": [{"arm": "hf_bf16", "metric": "moe_backend", "equals": "grouped_mm"}]})
    rows = steps("hf_bf16", 2.0) + steps("unsloth_bf16", 1.0)
    ok = cl.judge(c, rows + [row("hf_bf16", "moe_backend", "grouped_mm")], info())
    assert ok["verdict"] == cl.HOLDS and f"{RUN}/bench/hf_bf16/d1/moe_backend" in ok["provenance_ids"]
    eager = cl.judge(c, rows + [row("hf_bf16", "moe_backend", "eager")], info())
    assert eager["verdict"] == cl.UNTESTABLE and "eager" in eager["reason"]
    assert cl.judge(c, rows, info())["verdict"] == cl.UNTESTABLE  # the fact was not measured
    four = claim({"kind": "value", "of": {"arm": "unsloth_4bit", "metric": "peak_reserved_gb"}}, {"max": 12.8},
                 {"rows": [{"arm": "unsloth_4bit", "metric": "expert_weights_4bit_fraction", "min": 0.5}]})
    out = cl.judge(four, [row("unsloth_4bit", "peak_reserved_gb", 10.0),
                          row("unsloth_4bit", "expert_weights_4bit_fraction", 0.0)], info())
    assert out["verdict"] == cl.UNTESTABLE and "expert_weights_4bit_fraction" in out["reason"]


def test_memory_not_binding():
    c = claim(ratio("e4b_4bit", "hf_bf16", "j_per_token", "energy"), {"min": 1.2, "max": 2.3},
              {"memory_not_binding": {"max_fraction": 0.9}})
    rows = [row("e4b_4bit", "j_per_token", 0.4, stage="energy"), row("hf_bf16", "j_per_token", 0.25, stage="energy"),
            row("e4b_4bit", "peak_reserved_gb", 36.0)]
    assert cl.judge(c, rows + [row("hf_bf16", "peak_reserved_gb", 65.0)], info())["verdict"] == cl.HOLDS
    out = cl.judge(c, rows + [row("hf_bf16", "peak_reserved_gb", 78.0)], info())
    assert out["verdict"] == cl.UNTESTABLE and "binding" in out["reason"]
    out = cl.judge(c, rows + [row("hf_bf16", "peak_reserved_gb", 65.0)], info(gpu="none", gpu_memory_gb=None))
    assert out["verdict"] == cl.UNTESTABLE


@pytest.mark.parametrize("bad,word", [
    ({"metric": {"kind": "sum"}}, "metric.kind"),
    ({"expect": {"unit": "GiB"}}, "min"),
    ({"conditions": {"moon": ["full"]}}, "moon"),
    ({"metric": {"kind": "ratio", "numerator": {"arm": "a"}}}, "numerator"),
])
def test_bad_entries_are_named(bad, word):
    entry = {"id": "x", "text": "t", "source": "s", "metric": ratio("a", "b"), "expect": {"min": 1}, **bad}
    with pytest.raises(cl.ClaimsError, match=word):
        cl.check_claim(entry)


def test_ledger_file(tmp_path):
    ledger = cl.load_ledger(ROOT / "config" / "claims.yaml")
    ids = {c["id"] for c in ledger}
    assert {"unsloth-moe-2x-vs-transformers5", "seed-splitlora-10-12x-h100", "e4b-4bit-energy-1.2-2.3x",
            "bnb-load-in-4bit-quantizes-fused-experts", "e4b-unsloth-1.92x-gpu-time-qwen3"} <= ids
    dup = tmp_path / "dup.yaml"
    dup.write_text((ROOT / "config" / "claims.yaml").read_text().replace("id: unsloth-moe-35pct-less-vram",
                                                                         "id: unsloth-moe-2x-vs-transformers5"))
    with pytest.raises(cl.ClaimsError, match="twice"):
        cl.load_ledger(dup)


def test_main_writes_ledger_outputs(tmp_path):
    from docutils.core import publish_doctree

    run = tmp_path / RUN
    write_rows(run / "metrics.csv", steps("hf_bf16", 2.0, 2.0) + steps("unsloth_bf16", 1.0, 1.0)
               + [row("hf_bf16", "moe_backend", "grouped_mm")])
    (run / "tier.json").write_text(json.dumps({"tier": "h100_80gb", "gpu": {"name": "H100", "memory_gb": 79.2},
                                               "plan": {"model_scale": "full"}}))
    ledger = tmp_path / "claims.yaml"
    ledger.write_text("claims:\n"
                      "  - {id: fast, text: 'about 2x', source: {who: u}, expect: {min: 1.8},\n"
                      "     metric: {kind: ratio, numerator: {arm: hf_bf16, metric: step_s},\n"
                      "              denominator: {arm: unsloth_bf16, metric: step_s}}}\n"
                      "  - {id: a100, text: 'on A100', source: s, expect: {min: 1.8},\n"
                      "     conditions: {tier: [a100_40gb]},\n"
                      "     metric: {kind: ratio, numerator: {arm: hf_bf16, metric: step_s},\n"
                      "              denominator: {arm: unsloth_bf16, metric: step_s}}}\n")
    out = {k: tmp_path / f"out.{k}" for k in ("json", "md", "html", "rst")}
    assert cl.main(["--ledger", str(ledger), "--run-dir", str(run), "--out-json", str(out["json"]),
                    "--out-md", str(out["md"]), "--out-html", str(out["html"]), "--out-caption", str(out["rst"])]) == 0
    doc = json.loads(out["json"].read_text())
    assert doc["run"] == RUN and doc["counts"] == {cl.HOLDS: 1, cl.FAILS: 0, cl.UNTESTABLE: 1}
    assert [c["verdict"] for c in doc["claims"]] == [cl.HOLDS, cl.UNTESTABLE]
    assert f"`{RUN}/bench/hf_bf16/d2/step_s`" in out["md"].read_text()
    assert "not testable here" in out["html"].read_text()
    tree = publish_doctree(out["rst"].read_text(), settings_overrides={"report_level": 5, "halt_level": 5})
    errors = [n.astext() for n in tree.findall() if n.tagname == "system_message"]  # the caption is valid rst
    assert not errors, errors
    bad = tmp_path / "bad.yaml"
    bad.write_text("claims:\n  - {id: x, text: t, source: s, expect: {min: 1}, metric: {kind: nope}}\n")
    assert cl.main(["--ledger", str(bad), "--run-dir", str(run), "--out-json", str(tmp_path / "x.json"),
                    "--out-md", str(tmp_path / "x.md")]) == 2


@pytest.mark.skipif(not (H100 / "provenance.json").is_file(), reason="the committed H100 run is not in this tree")
def test_committed_h100_ledger_rests_on_its_provenance():
    from moebench.provenance import load_numbers

    doc = cl.build(ROOT / "config" / "claims.yaml", H100)
    numbers = load_numbers(H100 / "provenance.json")
    by_id = {c["id"]: c for c in doc["claims"]}
    for c in doc["claims"]:
        assert set(c["provenance_ids"]) <= set(numbers), c["id"]
        if c["verdict"] != cl.UNTESTABLE:
            assert c["provenance_ids"] and c["value"] is not None, c["id"]
    assert by_id["bnb-load-in-4bit-quantizes-fused-experts"]["verdict"] == cl.FAILS
    assert by_id["bnb-load-in-4bit-quantizes-fused-experts"]["value"] == 0.0
    for cid in ("seed-splitlora-7-10x-a100-40gb", "e4b-unsloth-1.92x-gpu-time-qwen3"):
        assert by_id[cid]["verdict"] == cl.UNTESTABLE and "this run's" in by_id[cid]["reason"]


def test_ledger_cites_public_sources():
    """Every claim names a public page or paper a reader outside the project can open, or says it has none."""
    for c in cl.load_ledger(ROOT / "config" / "claims.yaml"):
        src = c["source"]
        assert isinstance(src, dict) and src.get("who") and src.get("where"), c["id"]
        assert "issue 11" not in src["where"], c["id"]
        if src.get("unpublished"):
            assert "url" not in src, c["id"]
        else:
            assert str(src.get("url", "")).startswith("https://") or src.get("paper"), c["id"]


def test_a_claim_is_judged_only_at_the_settings_it_names():
    vram = claim({"kind": "value", "of": {"arm": "unsloth_4bit", "metric": "peak_reserved_gb"}},
                 {"max": 12.8, "unit": "GiB"}, {"settings": {"lora_r": 8, "batch": 1, "seq_len": 1024}})
    rows = [row("unsloth_4bit", "peak_reserved_gb", 31.3, unit="GB")]
    bench = cl.run_settings({"lora": {"r": 64}}, {"batch": 2, "seq_len": 4096})
    out = cl.judge(vram, rows, info(settings=bench))
    assert out["verdict"] == cl.UNTESTABLE and out["value"] is None
    assert "lora_r 8 (this run: 64)" in out["reason"] and "seq_len 1024 (this run: 4096)" in out["reason"]
    notebook = cl.run_settings({"lora": {"r": 8}}, {"batch": 1, "seq_len": 1024})
    assert cl.judge(vram, rows, info(settings=notebook))["verdict"] == cl.FAILS  # 29.1 GiB > 12.8
    with pytest.raises(cl.ClaimsError, match="lora_rank"):
        cl.check_claim({**vram, "conditions": {"settings": {"lora_rank": 8}}})
