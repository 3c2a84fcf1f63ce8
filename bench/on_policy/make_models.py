#!/usr/bin/env python3
"""Random-weight Qwen2 models at Qwen2.5-0.5B and -1.5B shapes with a tokenizer of Qwen's size,
for timing on-policy distillation (the weights' values do not change its speed).

    python bench/on_policy/make_models.py OUT_DIR [NAME ...]

Writes OUT_DIR/{student-0.5b,teacher-1.5b,student-1.5b}: bench/configs' Qwen2.5 config.json, bf16
model.safetensors,
and a word-level tokenizer.json with 151,643 words + Qwen's three specials at Qwen's ids,
with the tiny fixtures' ChatML tokenizer_config.json.
"""
import json
import shutil
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import Qwen2Config, Qwen2ForCausalLM

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = 151_643


def tokenizer(out: Path, fixtures: Path):
    vocab = {f"w{i}": i for i in range(WORDS)}
    for j, s in enumerate(SPECIALS):
        vocab[s] = WORDS + j
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    shutil.copy(fixtures / "tiny-qwen2" / "tokenizer_config.json", out / "tokenizer_config.json")


def model(out: Path, shape: str, seed: int, fixtures: Path):
    torch.manual_seed(seed)
    cfg = Qwen2Config.from_json_file(str(fixtures.parents[1] / "bench" / "configs" / f"qwen2.5-{shape}" / "config.json"))
    cfg.eos_token_id, cfg.bos_token_id = WORDS + 2, WORDS
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        m = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(out)
    json.dump({"eos_token_id": WORDS + 2, "bos_token_id": WORDS}, open(out / "generation_config.json", "w"))
    tokenizer(out, fixtures)


def main():
    root = Path(sys.argv[1])
    fixtures = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
    wanted = sys.argv[2:] or ["student-0.5b", "teacher-1.5b", "student-1.5b"]
    for name, shape, seed in [("student-0.5b", "0.5b", 1), ("teacher-1.5b", "1.5b", 2), ("student-1.5b", "1.5b", 3)]:
        if name not in wanted:
            continue
        out = root / name
        out.mkdir(parents=True, exist_ok=True)
        model(out, shape, seed, fixtures)
        print("made", out, flush=True)


if __name__ == "__main__":
    main()
