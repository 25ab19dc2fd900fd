"""GPU check of the Unsloth arms' eager MoE autotune on a packed 4-bit expert stack (Qwen3-MoE, small widths).

Builds a 2-layer Qwen3-MoE (hidden 512, 16 experts of width 256, top-4) with moebench's tokenizer, loads it the
way unsloth_4bit does (load_in_4bit, UNSLOTH_MOE_BACKEND=unsloth_triton), runs moebench's prewarm, then one LoRA
training step, and prints the prewarm record; Unsloth's own log lines ("MoE kernel auto-tuning failed") show in
the console if the traced first call still tunes. Needs CUDA and unsloth:
    PYTHONPATH=scripts python devtools/prewarm_check.py
Cold, the tuning alone takes minutes (Triton benchmarks every configuration): give it 6-10 minutes. First tried
2026-12-02 with the session's last 3 GPU-minutes: built 15 s, loaded 38 s, then the prewarm was still tuning when
the time ran out at 170 s, with no error printed (sitting 5's packed-shape bug failed within seconds). Not yet
a confirmation. Second try 2026-12-02 (8 GPU-minutes, after sitting 6): built 18 s, loaded 41 s, the prewarm
tuned both expert GEMMs in 256 s, then one LoRA step (loss 8.395) at 325 s, with no "auto-tuning failed" or other
fallback in the console (results/h200-qwen3-30b-a3b/logs/prewarm-check-sitting6-2026-12-02.log): the packed-shape
fix works on a GPU; a full-size unsloth_4bit draw has yet to confirm it.
"""
import logging
import os
import sys
import time

sys.path.insert(0, "scripts")
from moebench import config as cfgmod, models  # noqa: E402
from moebench.corpus import corpus_text  # noqa: E402
from moebench.arms.unsloth_runtime import preimport_unsloth, prewarm_if_triton  # noqa: E402

t0 = time.time()
out = "/tmp/prewarm-check-model"
fam = cfgmod.load_yaml("models.yaml")["qwen3-30b-a3b"]
models.build(fam, "tiny", "random-init", out, 42, corpus_text(20, 42), logging.getLogger("b"), device="cpu")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

cfg = AutoConfig.from_pretrained(out)
cfg.update(dict(hidden_size=512, moe_intermediate_size=256, intermediate_size=512, num_experts=16,
                num_experts_per_tok=4, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, head_dim=64))
AutoModelForCausalLM.from_config(cfg).to("cuda").to(__import__("torch").bfloat16).save_pretrained(out)
print(f"built in {time.time() - t0:.0f} s", flush=True)
os.environ["UNSLOTH_MOE_BACKEND"] = "unsloth_triton"
preimport_unsloth()
import torch  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402

model, _ = FastLanguageModel.from_pretrained(model_name=out, max_seq_length=256, dtype=torch.bfloat16,
                                             load_in_4bit=True, local_files_only=True)
print(f"loaded in {time.time() - t0:.0f} s", flush=True)
print("PREWARM", prewarm_if_triton(model), flush=True)
model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj",
                                                                                    "up_proj", "down_proj"])
ids = torch.randint(0, cfg.vocab_size, (1, 256), device="cuda")
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
print(f"STEP loss {float(loss):.3f} at {time.time() - t0:.0f} s", flush=True)
