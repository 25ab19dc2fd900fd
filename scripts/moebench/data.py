"""Synthetic coding-agent conversations in OpenAI Harmony form, rendered with the tokenizer's chat template.

Same config -> byte-identical files (seeded RNG, sorted keys, no timestamps); the sha256 is recorded.
"""
from __future__ import annotations

import argparse
import json

# the conversations themselves are shared (the models stage trains its tokenizer on them); data.X works as before
from .corpus import (DEVELOPER, ERRORS, FUNCS, LANGS, MODULES, SYSTEM, TEMPLATES,  # noqa: F401
                     conversations, corpus_text, split)
from .io import atomic_write, logger, sha256_file

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.thinking %}{{ m.thinking }}\n{% endif %}"
          "{% for c in m.tool_calls or [] %}<tool_call>{{ c | tojson }}</tool_call>\n{% endfor %}"
          "{{ m.content or '' }}<|im_end|>\n{% endfor %}")


def render(conv: dict, tokenizer) -> tuple[str, str]:
    """Render with the tokenizer's chat template; ChatML when it has none. Returns (text, template used)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(conv["messages"], tokenize=False), "tokenizer"
    return tokenizer.apply_chat_template(conv["messages"], tokenize=False, chat_template=CHATML), "chatml"


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows)


def build(model_dir: str, n: int, seed: int, heldout_fraction: float, out_dir: str, log) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    convs = conversations(n, seed)
    rows, used = [], set()
    for conv in convs:
        text, how = render(conv, tok)
        used.add(how)
        rows.append({**conv, "text": text, "n_tokens": len(tok(text)["input_ids"])})
    train, held = split(rows, heldout_fraction, seed)
    atomic_write(f"{out_dir}/train.jsonl", _jsonl(train))
    atomic_write(f"{out_dir}/heldout.jsonl", _jsonl(held))
    sums = {name: sha256_file(f"{out_dir}/{name}") for name in ("train.jsonl", "heldout.jsonl")}
    log.info("rendered %d conversations (%s template): %d train, %d held out; mean %.0f tokens",
             n, "/".join(sorted(used)), len(train), len(held), sum(r["n_tokens"] for r in rows) / len(rows))
    return sums


def main(argv=None):
    from . import config as cfgmod

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--model", required=True, help="model directory holding the tokenizer")
    ap.add_argument("--out", required=True, help="data directory")
    ap.add_argument("--sha", required=True)
    ap.add_argument("--log")
    a = ap.parse_args(argv)
    log = logger("data", a.log)
    d = cfgmod.load(a.config)["data"]
    sums = build(a.model, d["conversations"], d["seed"], d["heldout_fraction"], a.out, log)
    atomic_write(a.sha, "".join(f"{v}  {k}\n" for k, v in sorted(sums.items())))


if __name__ == "__main__":
    main()
