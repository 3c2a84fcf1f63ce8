#!/usr/bin/env python3
"""PyTorch baselines for `distill bench`, with the same arguments and the same rows.

    python3 bench/pytorch/bench.py [gemm|loss|lora|full|train|memory|generate|B1..B6 ...]
        --config DIR [--config DIR ...] [--json FILE] [--device cuda|cpu] [options]

Every option of `distill bench` means the same here (see `distill bench --help` and
docs/PERFORMANCE.md); `--loss hf` swaps distill's chunked KL + CE for the model's own
full-logits CE. As in distill, the parent runs each case in a child process (this script
with --run-case) so each case's peak memory is its own and an out-of-memory error ends only
that case. Rows are printed as a table and written, one JSON object per line, to --json.

--liger patches Liger's kernels into every case; --unsloth runs the LoRA and QLoRA training
cases (B3, and B5 with --mem-mode lora) with Unsloth instead of HF + PEFT (unsloth_twin.py)
and gives every other case an error row saying so.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

ALL = ["B1", "B2", "B3", "B4", "B5", "B6"]
NAMES = {"b1": ["B1"], "gemm": ["B1"], "b2": ["B2"], "loss": ["B2"], "b3": ["B3"], "lora": ["B3"],
         "b4": ["B4"], "full": ["B4"], "train": ["B3", "B4"], "b5": ["B5"], "memory": ["B5"],
         "b6": ["B6"], "generate": ["B6"], "all": ALL}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", nargs="*")
    p.add_argument("--only", default="")
    p.add_argument("--config", action="append", required=True, dest="configs")
    p.add_argument("--json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--chunk-tokens", type=int, default=1024)
    p.add_argument("--recompute", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--loss", choices=["kd", "hf"], default="kd")
    p.add_argument("--peak-tflops", type=float)
    p.add_argument("--peak-n", type=int)
    p.add_argument("--quantize", choices=["none", "nf4"], default="none",
                   help="LoRA cases: the frozen base in bf16 or NF4 (QLoRA, bitsandbytes Linear4bit)")
    p.add_argument("--mem-mode", choices=["lora", "full"], default="lora")
    p.add_argument("--mem-cap-gib", type=float, default=24.0)
    p.add_argument("--mem-start", type=int, default=2048)
    p.add_argument("--mem-max", type=int, default=65536)
    p.add_argument("--mem-step", type=int, default=1024)
    p.add_argument("--mem-budget-s", type=float, default=300.0)
    p.add_argument("--gen-batch", default="1")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gen-top-p", type=float, default=1.0, help="B6, when sampling: the nucleus")
    p.add_argument("--gen-samples", type=int, default=1,
                   help="B6: samples of each prompt (batch / this many distinct prompts, repeated)")
    p.add_argument("--gen-temperature", type=float, default=0.0,
                   help="B6: sample at this temperature over the whole vocabulary (top-p 1, top-k 0), "
                        "as `distill bench generate --gen-temperature` does; 0 is greedy")
    p.add_argument("--liger", action="store_true",
                   help="patch Qwen2 with Liger's kernels (apply_liger_kernel_to_qwen2) in every case; "
                        "rows say framework pytorch+liger")
    p.add_argument("--unsloth", action="store_true",
                   help="LoRA / QLoRA training cases load and patch the model with Unsloth "
                        "(FastLanguageModel); rows say framework unsloth; other cases are not run")
    p.add_argument("--run-case", type=int, help=argparse.SUPPRESS)
    p.add_argument("--probe-seq", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.gen_batch = [int(x) for x in a.gen_batch.split(",") if x]
    if a.unsloth and a.liger:
        p.error("--unsloth and --liger are separate twins: pass one")
    if a.unsloth and not a.device.startswith("cuda"):
        p.error("--unsloth needs a CUDA device (Unsloth's kernels are GPU-only)")
    return a


def selected(a):
    names = list(a.which) + [x for x in a.only.split(",") if x]
    if not names:
        return ALL
    out = []
    for n in names:
        if n.lower() not in NAMES:
            sys.exit(f"error: unknown benchmark `{n.lower()}`; use gemm, loss, lora, full, train, memory, "
                     "generate or B1..B6")
        out += NAMES[n.lower()]
    return [b for b in ALL if b in out]


def plan(a):
    """The same case list as distill's, in the same order: the peak first."""
    cases = [("peak", None, None)]
    for b in selected(a):
        for c in range(len(a.configs)):
            if b == "B1":
                cases.append(("gemm", c, None))
            elif b == "B2":
                cases += [("loss", c, False), ("loss", c, True)]
            elif b == "B3":
                cases.append(("train", c, True))
            elif b == "B4":
                cases.append(("train", c, False))
            elif b == "B5":
                cases.append(("memory", c, None))
            elif b == "B6":
                cases += [("generate", c, bs) for bs in a.gen_batch]
    return cases


def bench_of(case):
    kind, _, x = case
    return {"peak": "peak", "gemm": "B1", "loss": "B2", "memory": "B5", "generate": "B6"}.get(
        kind, "B3" if x else "B4")


def model_name(d):
    return os.path.basename(os.path.normpath(d))


def recompute_for(a, shape):
    if a.recompute == "auto":
        return common.matmul_params(shape) > 4_000_000_000
    return a.recompute == "on"


def peak_n(a):
    return a.peak_n or (8192 if a.device.startswith("cuda") else 256)


def framework(a):
    return "unsloth" if a.unsloth else "pytorch+liger" if a.liger else "pytorch"


def train_mode(a, lora):
    if not lora:
        return "full"
    return f"qlora nf4 r{a.lora_r}" if a.quantize == "nf4" else f"lora r{a.lora_r}"


def train_case_name(a, lora, batch, seq, recompute):
    return f"{train_mode(a, lora)} {batch}x{seq}{' recompute' if recompute else ''}"


def memory_case_name(a):
    return f"{a.mem_mode} bs1 under {common.fmt_num(a.mem_cap_gib)} GiB"


def unsloth_refusal(a, case):
    """Why the Unsloth twin does not run `case` (None: it does, or this is not that twin).
    Unsloth's FastLanguageModel patches LoRA / QLoRA training; measuring its other cases would
    measure plain PyTorch under another name. The peak GEMM is the device's, not a framework's."""
    kind, _, x = case
    if not a.unsloth or kind == "peak" or (kind == "train" and x) or (kind == "memory" and a.mem_mode == "lora"):
        return None
    if kind in ("train", "memory"):
        return "not run: the Unsloth twin covers LoRA and QLoRA training, not full fine-tuning"
    return f"not run: the Unsloth twin covers LoRA and QLoRA training, not the {kind} benchmark"


def refused_row(a, case, why):
    kind, ci, x = case
    if kind == "train":
        shape = common.Shape.from_dir(a.configs[ci])
        name = train_case_name(a, x, a.batch, a.seq, recompute_for(a, shape))
    elif kind == "memory":
        name = memory_case_name(a)
    else:
        name = repr(case)  # as Parent.child names a case that left no row
    r = common.base_row(bench_of(case), model_name(a.configs[ci]), name)
    r.update(framework=framework(a), error=why)
    return r


# --- one case, in this process ----------------------------------------------------------------

def run_case(a, case):
    import workloads as w

    kind, ci, x = case
    build = None
    if a.unsloth and kind != "peak":
        import unsloth_twin

        unsloth_twin.ensure_model_dir(a.configs[ci])  # before the memory watch: a build is not the case's
    dev = w.device_of(a)
    watch = common.MemWatch(dev, int(a.device.split(":")[1]) if ":" in a.device else 0)
    if a.unsloth and kind != "peak":
        unsloth = unsloth_twin.import_unsloth()  # first: it patches transformers as it is imported
        build = unsloth_twin.build_model
    if a.liger:
        # Before any model is built: Liger swaps the Qwen2 module's RMSNorm, RoPE, SwiGLU and
        # (for HF's own loss) the fused linear cross-entropy, as TRL and axolotl users enable it.
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2
        apply_liger_kernel_to_qwen2()

    rows = []
    peak = a.peak_tflops
    tokens = a.batch * a.seq
    dtype = "bf16" if dev == "cuda" else "f32"
    model = model_name(a.configs[ci]) if ci is not None else ""
    shape = common.Shape.from_dir(a.configs[ci]) if ci is not None else None
    if kind == "peak":
        n = peak_n(a)
        fwd, _ = w.bench_gemm(a, n, n, n, max(a.warmup, 1), a.iters)
        r = common.base_row("peak", "", f"square {n}x{n}x{n} fwd")
        r.update(tflops=2.0 * n ** 3 / fwd / 1e12, ms=fwd * 1e3, config={"m": n, "k": n, "n": n, "dtype": dtype})
        rows.append(r)
    elif kind == "gemm":
        n = peak_n(a)
        for name, m, k, nn in common.training_gemms(shape, tokens, a.chunk_tokens, a.lora_r) + \
                [(f"square {n}", n, n, n)]:
            print(f"B1 {name}: {m} x {k} x {nn}", file=sys.stderr)
            fwd, fb = w.bench_gemm(a, m, k, nn, max(a.warmup, 1), a.iters)
            flops = 2.0 * m * k * nn
            cfg = {"m": m, "k": k, "n": nn, "dtype": dtype, "iters": a.iters}
            tf = flops / fwd / 1e12
            r = common.base_row("B1", model, f"{name} {m}x{k}x{nn} fwd")
            r.update(tflops=tf, mfu=common.mfu(tf, peak), ms=fwd * 1e3, config=cfg)
            rows.append(r)
            bwd = fb - fwd
            btf = 2.0 * flops / bwd / 1e12 if bwd > 0 else None
            r = common.base_row("B1", model, f"{name} {m}x{k}x{nn} bwd")
            r.update(tflops=btf, mfu=common.mfu(btf, peak), ms=bwd * 1e3, fwd_bwd_ms=fb * 1e3, config=cfg)
            rows.append(r)
    elif kind == "loss":
        naive = x
        chunk = tokens if naive else min(a.chunk_tokens, tokens)
        print(f"B2 {model}: {tokens} tokens, vocab {shape.vocab}, chunk {chunk}", file=sys.stderr)
        secs = w.bench_loss(a, shape, tokens, chunk, max(a.warmup, 1), a.iters)
        tf = common.loss_flops(shape, tokens) / secs / 1e12
        r = common.base_row("B2", model, "naive full logits" if naive else f"chunked {chunk}")
        r.update(tokens_per_s=tokens / secs, tflops=tf, mfu=common.mfu(tf, peak), ms=secs * 1e3,
                 config={"tokens": tokens, "hidden": shape.hidden, "vocab": shape.vocab,
                         "chunk_tokens": chunk, "top_k": a.top_k, "dtype": dtype})
        rows.append(r)
    elif kind in ("train", "memory"):
        probe = kind == "memory"
        lora = (a.mem_mode == "lora") if probe else x
        if probe:
            if a.probe_seq is None:
                sys.exit("error: a B5 case runs with --probe-seq")
            batch, seq, recompute, warmup, steps = 1, a.probe_seq, True, 1, 1
        else:
            batch, seq, recompute, warmup, steps = a.batch, a.seq, recompute_for(a, shape), a.warmup, max(a.steps, 1)
        print(f"{bench_of(case)} {model}: {batch} x {seq} tokens, {'LoRA' if lora else 'full fine-tune'}, "
              f"recompute {str(recompute).lower()}, loss {a.loss}", file=sys.stderr)
        seconds, losses = w.bench_train(a, a.configs[ci], lora, batch, seq, recompute, warmup, steps, build)
        mean = sum(seconds) / len(seconds)
        tps = batch * seq / mean
        tf = common.train_flops_per_token(shape, seq, a.lora_r if lora else None) * tps / 1e12
        mode = train_mode(a, lora)
        r = common.base_row(bench_of(case), model, train_case_name(a, lora, batch, seq, recompute))
        r.update(tokens_per_s=tps, tflops=tf, mfu=common.mfu(tf, peak), ms=mean * 1e3,
                 step_ms=[s * 1e3 for s in seconds], losses=losses,
                 config={"batch": batch, "seq": seq, "mode": mode, "recompute": recompute,
                         "top_k": a.top_k, "kd_ratio": 0.5 if a.top_k > 0 else 0.0, "loss": a.loss,
                         "chunk_tokens": a.chunk_tokens, "warmup": warmup, "steps": steps,
                         "optimizer": "AdamW (fused)" if dev == "cuda" else "AdamW", "dtype": dtype})
        rows.append(r)
    elif kind == "generate":
        bs = x
        print(f"B6 {model}: batch {bs}, {a.prompt_len} prompt -> {a.new_tokens} new tokens", file=sys.stderr)
        secs, new_tokens = w.bench_generate(a, a.configs[ci], bs)
        tf = common.generate_flops_per_token(shape) * bs * (a.prompt_len + a.new_tokens) / secs / 1e12
        sampled = ""
        if a.gen_temperature > 0:
            sampled = f" sampled t{a.gen_temperature:g}" + (f" p{a.gen_top_p:g}" if a.gen_top_p < 1 else "")
        samples = max(1, min(a.gen_samples, bs))
        if samples > 1:
            sampled += f" x{samples} per prompt"
        r = common.base_row("B6", model, f"bs{bs} {a.prompt_len}->{a.new_tokens}{sampled}")
        r.update(tokens_per_s=new_tokens / secs, tflops=tf, mfu=common.mfu(tf, peak), ms=secs * 1e3,
                 new_tokens=new_tokens,
                 config={"batch": bs, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                         "sampling": "sampled" if a.gen_temperature > 0 else "greedy",
                         "temperature": a.gen_temperature, "top_p": a.gen_top_p,
                         "samples_per_prompt": samples, "kv_cache": True,
                         "dtype": dtype})
        rows.append(r)
    extra = w.peak_memory_extra(a)
    peak_gib, method, device = watch.finish()
    version = w.versions()
    if a.liger:
        import liger_kernel
        version += f", liger-kernel {getattr(liger_kernel, '__version__', '?')}"
    if build is not None:
        version += f", unsloth {getattr(unsloth, '__version__', '?')}"
    for r in rows:
        r.update(peak_gib=peak_gib, mem_method=method, device=device, version=version, framework=framework(a),
                 **extra)
        common.emit(r)


# --- the parent ------------------------------------------------------------------------------

class Parent:
    def __init__(self, a, argv):
        self.a, self.argv, self.rows, self.peak = a, argv, [], a.peak_tflops
        if a.json:
            open(a.json, "w").close()

    def child(self, i, case, probe_seq=None):
        cmd = [sys.executable, os.path.abspath(__file__)] + self.argv + ["--run-case", str(i)]
        if probe_seq is not None:
            cmd += ["--probe-seq", str(probe_seq)]
        if self.a.peak_tflops is None and self.peak:
            cmd += ["--peak-tflops", repr(self.peak)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        rows = []
        for line in proc.stdout:
            if line.startswith(common.ROW_PREFIX):
                rows.append(json.loads(line[len(common.ROW_PREFIX):]))
            else:
                print(line, end="")
        code = proc.wait()
        if code != 0 and not rows:
            r = common.base_row(bench_of(case), model_name(self.a.configs[case[1]]) if case[1] is not None else "",
                                repr(case))
            r.update(framework=framework(self.a), error=f"the case process failed (exit {code}); see stderr above")
            rows.append(r)
        return rows

    def record(self, rows):
        for r in rows:
            print("  " + table_line(r), file=sys.stderr)
        self.rows += rows
        if self.a.json:
            with open(self.a.json, "w") as f:
                for r in self.rows:
                    f.write(json.dumps(r) + "\n")

    def envelope(self, i, case):
        """B5: the same search as distill's (double from --mem-start, then bisect to --mem-step)."""
        a = self.a
        shape = common.Shape.from_dir(a.configs[case[1]])
        lora = a.mem_mode == "lora"
        cap = a.mem_cap_gib
        static_gib = common.static_train_bytes(shape, a.lora_r if lora else None) / common.GIB
        started = time.time()
        probes = []
        good, bad = None, None

        def probe(seq):
            print(f"B5 probe: seq {seq}", file=sys.stderr)
            rows = self.child(i, case, seq)
            row = rows[0] if rows else None
            peak = row.get("peak_gib") if row else None
            ok = row is not None and "error" not in row and (peak is None or peak <= cap)
            probes.append({"seq": seq, "ok": ok, "peak_gib": peak})
            return row if ok else None

        def out_of_time():
            return time.time() - started > a.mem_budget_s

        step = max(a.mem_step, 1)
        seq = max(a.mem_start, step)
        if static_gib > cap:
            seq = step
        while True:
            row = probe(seq)
            if row is not None:
                good = (seq, row)
                if seq >= a.mem_max or out_of_time():
                    break
                seq = min(seq * 2, a.mem_max)
            else:
                bad = seq
                break
        while good is None and seq > step and static_gib <= cap and not out_of_time():
            seq = max(seq // 2, step) // step * step
            row = probe(seq)
            if row is not None:
                good = (seq, row)
            else:
                bad = seq
        while good is not None and bad is not None and bad - good[0] > step and not out_of_time():
            mid = (good[0] + (bad - good[0]) // 2) // step * step
            if mid <= good[0]:
                break
            row = probe(mid)
            if row is not None:
                good = (mid, row)
            else:
                bad = mid
        r = common.base_row("B5", model_name(a.configs[case[1]]), memory_case_name(a))
        r["framework"] = framework(a)
        if good is not None and bad is not None:
            resolved = bad - good[0] <= step
        elif good is not None:
            resolved = good[0] >= a.mem_max
        else:
            resolved = seq <= step or static_gib > cap
        r.update(seq=good[0] if good else 0, first_failing_seq=bad, resolved=resolved, cap_gib=cap,
                 static_gib=static_gib)
        if good:
            for k in ("peak_gib", "mem_method", "tokens_per_s", "device", "config", "version",
                      "torch_max_allocated_gib", "torch_max_reserved_gib"):
                if k in good[1]:
                    r[k] = good[1][k]
        r["probes"] = probes
        return r

    def run_all(self, cases):
        print(f"pytorch bench: {len(cases) - 1} case(s) on {self.a.device}, each in its own process",
              file=sys.stderr)
        for i, case in enumerate(cases):
            why = unsloth_refusal(self.a, case)
            if why:
                self.record([refused_row(self.a, case, why)])
            elif case[0] == "peak":
                if self.peak is not None or all(unsloth_refusal(self.a, c) for c in cases[1:]):
                    continue
                rows = self.child(i, case)
                self.peak = next((r["tflops"] for r in rows if r.get("tflops")), None)
                self.record(rows)
            elif case[0] == "memory":
                self.record([self.envelope(i, case)])
            else:
                self.record(self.child(i, case))
        print(HEADER)
        for r in self.rows:
            print(table_line(r))


HEADER = f"{'bench':<5} {'model':<14} {'case':<46} {'tok/s':>11} {'TFLOP/s':>9} {'MFU':>6} {'peak GiB':>9} {'ms':>10}"


def table_line(r):
    def f(k, prec):
        v = r.get(k)
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return "-"
        p = max(prec, 3) if (v != 0 and abs(v) < 1) else prec
        return f"{v:.{p}f}"

    case = r.get("case", "")
    if r.get("bench") == "B5":
        case = f"{case}: seq {r.get('seq')}"
    if "error" in r:
        case = f"{case} FAILED: {r['error']}"
    return (f"{r.get('bench', ''):<5} {r.get('model', ''):<14} {case:<46} {f('tokens_per_s', 0):>11} "
            f"{f('tflops', 1):>9} {f('mfu', 3):>6} {f('peak_gib', 2):>9} {f('ms', 2):>10}")


def main(argv):
    a = parse(argv)
    cases = plan(a)
    if a.run_case is not None:
        run_case(a, cases[a.run_case])
        return
    Parent(a, argv).run_all(cases)


if __name__ == "__main__":
    main(sys.argv[1:])
