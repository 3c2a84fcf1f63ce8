#!/usr/bin/env python3
"""The PyTorch anchor for distill's on-policy step: one GKD step as TRL's GKDTrainer runs it
(lmbda = 1), in plain transformers + PEFT: the student samples with `generate` (KV cache,
left padding), the teacher scores the sequences, TRL's generalized JSD (its own source, as in
tests/fixtures/gkd) trains LoRA adapters with AdamW over micro-batches.

    python bench/on_policy/pytorch_gkd.py --student DIR --teacher DIR --trl gkd_trainer.py \
        [--prompts 64] [--prompt-len 64] [--max-new 256] [--micro 8] [--steps 3] [--json FILE]

Prints one JSON line per step: seconds generating, scoring and training, and tokens per second.
"""
import argparse
import ast
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def trl_loss(source):
    tree = ast.parse(Path(source).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "generalized_jsd_loss":
            node.decorator_list = []
            scope = {"torch": torch, "F": F}
            exec(compile(ast.Module(body=[node], type_ignores=[]), source, "exec"), scope)
            return scope["generalized_jsd_loss"]
    raise SystemExit("no generalized_jsd_loss")


def sync():
    torch.cuda.synchronize()
    return time.perf_counter()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--student", required=True)
    p.add_argument("--teacher", required=True)
    p.add_argument("--trl", required=True)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--json")
    a = p.parse_args()
    loss_fn = trl_loss(a.trl)
    dev = "cuda"
    student = AutoModelForCausalLM.from_pretrained(a.student, dtype=torch.bfloat16).to(dev)
    student = get_peft_model(student, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    teacher = AutoModelForCausalLM.from_pretrained(a.teacher, dtype=torch.bfloat16).to(dev).eval()
    opt = torch.optim.AdamW([x for x in student.parameters() if x.requires_grad], lr=1e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    out = open(a.json, "a") if a.json else None
    for step in range(a.steps):
        ids = torch.randint(0, 151_000, (a.prompts, a.prompt_len), generator=g).to(dev)
        mask = torch.ones_like(ids)
        t0 = sync()
        student.eval()
        with torch.no_grad():
            seqs = student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.max_new,
                                    min_new_tokens=a.max_new, do_sample=True, temperature=1.0,
                                    top_k=0, top_p=1.0, pad_token_id=0)
        t1 = sync()
        labels = seqs.clone()
        labels[:, : a.prompt_len] = -100
        labels = labels[:, 1:]
        with torch.no_grad():
            teacher_logits = [teacher(input_ids=seqs[i:i + a.micro]).logits[:, :-1] for i in range(0, a.prompts, a.micro)]
        t2 = sync()
        student.train()
        n = (labels != -100).sum()
        for j, i in enumerate(range(0, a.prompts, a.micro)):
            logits = student(input_ids=seqs[i:i + a.micro]).logits[:, :-1]
            loss = loss_fn(logits.float(), teacher_logits[j].float(), labels=labels[i:i + a.micro],
                           beta=a.beta, reduction="sum") / n
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = sync()
        new = a.prompts * a.max_new
        row = {"step": step, "gen_s": t1 - t0, "score_s": t2 - t1, "train_s": t3 - t2,
               "step_s": t3 - t0, "gen_tokens_per_s": new / (t1 - t0), "tokens_per_s": new / (t3 - t0),
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
