"""What the PyTorch baselines share with `distill bench`: the FLOP formulas (the same as
crates/distill-bench/src/flops.rs, see docs/PERFORMANCE.md), peak-memory measurement,
timing with device synchronisation, and the JSON row format.

Only the standard library is imported at module level, so the formulas can be checked
without torch (`python3 bench/pytorch/common.py`).
"""

import json
import os
import subprocess
import sys
import threading
import time

ROW_PREFIX = "distill-bench-row: "
GIB = float(1 << 30)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --- FLOP counts (identical to distill_bench::flops) ----------------------------------------

class Shape:
    """The decoder shape of a Hugging Face config.json (a plain dict)."""

    def __init__(self, cfg):
        self.hidden = cfg["hidden_size"]
        self.layers = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads") or self.heads
        self.head_dim = cfg.get("head_dim") or self.hidden // self.heads
        self.inter = cfg["intermediate_size"]
        self.vocab = cfg["vocab_size"]
        self.tied = bool(cfg.get("tie_word_embeddings", False))

    @classmethod
    def from_dir(cls, d):
        with open(os.path.join(d, "config.json")) as f:
            return cls(json.load(f))

    def dims(self):
        return self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.inter


def layer_matmul_params(s):
    h, q, kv, i = s.dims()
    return h * q + 2 * h * kv + q * h + 3 * h * i


def matmul_params(s):
    """N: parameters one token multiplies through, the LM head included (tied or not)."""
    return s.layers * layer_matmul_params(s) + s.hidden * s.vocab


def lora_params(s, r, targets=LORA_TARGETS):
    h, q, kv, i = s.dims()
    sizes = {"q_proj": h + q, "k_proj": h + kv, "v_proj": h + kv, "o_proj": q + h,
             "gate_proj": h + i, "up_proj": h + i, "down_proj": h + i}
    return s.layers * r * sum(sizes.get(t, 0) for t in targets)


def attention_fwd_flops_per_token(s, seq):
    """PaLM convention: every key counted (not the causal half), QK^T and AV."""
    return 4.0 * s.layers * s.heads * s.head_dim * seq


def train_flops_per_token(s, seq, lora_r=None):
    n = float(matmul_params(s))
    attention = 3.0 * attention_fwd_flops_per_token(s, seq)
    if lora_r is None:
        return 6.0 * n + attention
    return 4.0 * n + 6.0 * lora_params(s, lora_r) + attention


def generate_flops_per_token(s):
    return 2.0 * matmul_params(s)


def loss_flops(s, tokens):
    return 4.0 * tokens * s.hidden * s.vocab


def mfu(tflops, peak):
    return tflops / peak if (peak and peak > 0 and tflops is not None) else None


def training_gemms(s, tokens, chunk, r):
    """(name, m, k, n) of one training step's GEMMs, as distill_bench::gemm::training_gemms."""
    h, q, kv, i = s.dims()
    c = min(chunk, tokens)
    g = [("q_proj", tokens, h, q), ("k_proj/v_proj", tokens, h, kv), ("o_proj", tokens, q, h),
         ("gate_proj/up_proj", tokens, h, i), ("down_proj", tokens, i, h),
         (f"lm_head (chunk {c})", c, h, s.vocab)]
    if r > 0:
        g += [(f"lora_A r{r} (gate/up)", tokens, h, r), (f"lora_B r{r} (gate/up)", tokens, r, i),
              (f"lora_A r{r} (down)", tokens, i, r)]
    return g


def static_train_bytes(s, lora_r):
    """Weights, gradients and AdamW moments before activations (as distill's B5 reports)."""
    embed = s.vocab * s.hidden
    params = matmul_params(s) + (0 if s.tied else embed)
    if lora_r is not None:
        return 2 * params + 16 * lora_params(s, lora_r)
    return 16 * params


# --- rows ---------------------------------------------------------------------------------

def base_row(bench, model, case):
    return {"framework": "pytorch", "bench": bench, "model": model, "case": case}


def emit(row):
    print(ROW_PREFIX + json.dumps(row), flush=True)


def fmt_num(x):
    """Numbers in case names as Rust's Display writes them (24.0 -> 24)."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


# --- peak memory ----------------------------------------------------------------------------

class MemWatch:
    """nvidia-smi memory.used polled every 20 ms, minus the value before the case touched the
    GPU: the same method as `distill bench` (docs/PERFORMANCE.md). On CPU: peak RSS."""

    def __init__(self, device, index=0):
        self.device = device
        self.index = index
        self.baseline = None
        self.max = None
        self.proc = None
        self.name = ""
        if device == "cuda":
            try:
                self.baseline = float(self._query("memory.used"))
                self.name = self._query("name")
                self.max = self.baseline
                self.proc = subprocess.Popen(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                     "-i", str(index), "-lms", "20"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                self.thread = threading.Thread(target=self._read, daemon=True)
                self.thread.start()
            except (OSError, ValueError, subprocess.CalledProcessError):
                self.baseline = None

    def _query(self, field):
        return subprocess.check_output(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits", "-i",
             str(self.index)], text=True).strip()

    def _read(self):
        for line in self.proc.stdout:
            try:
                self.max = max(self.max, float(line.strip()))
            except ValueError:
                pass

    def finish(self):
        if self.device == "cuda":
            if self.proc is None:
                return None, "none (nvidia-smi unavailable)", "cuda"
            time.sleep(0.06)
            self.proc.kill()
            self.proc.wait()
            self.thread.join(timeout=1)
            peak = max(0.0, self.max - self.baseline) * 1024 * 1024 / GIB
            return peak, "nvidia-smi memory.used peak - baseline (20 ms polling)", \
                f"cuda:{self.index} {self.name}"
        import resource
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib * 1024 / GIB, "ru_maxrss (process peak RSS)", "cpu"


# --- timing ---------------------------------------------------------------------------------

def sync(device):
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def time_calls(device, warmup, iters, f):
    """Mean seconds per call after `warmup` untimed calls, synchronised at both ends."""
    for _ in range(warmup):
        f()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        f()
    sync(device)
    return (time.perf_counter() - t0) / max(iters, 1)


def _self_check():
    """The hand-computed closed forms of distill_bench::flops's unit tests."""
    toy = Shape({"hidden_size": 4, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "num_key_value_heads": 1, "head_dim": 2, "intermediate_size": 8,
                 "vocab_size": 10, "tie_word_embeddings": True})
    assert layer_matmul_params(toy) == 144
    assert matmul_params(toy) == 328
    assert lora_params(toy, 1) == 128
    assert attention_fwd_flops_per_token(toy, 3) == 96.0
    assert train_flops_per_token(toy, 3) == 2256.0
    assert train_flops_per_token(toy, 3, 1) == 2368.0
    assert generate_flops_per_token(toy) == 656.0
    assert len(training_gemms(toy, 16, 8, 2)) == 9
    assert fmt_num(24.0) == "24" and fmt_num(0.5) == "0.5"
    print("common.py: FLOP formulas agree with the closed forms", file=sys.stderr)


if __name__ == "__main__":
    _self_check()
