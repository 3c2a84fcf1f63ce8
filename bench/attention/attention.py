"""Attention alone on the GPU: distill's flash kernels against PyTorch SDPA's cuDNN and
FlashAttention-2 backends, in one process, forward and forward + backward, causal, GQA, bf16.

    python3 bench/attention/attention.py [--seq 2048,8192,16384,32768] [--heads 28 --kv-heads 4
        --head-dim 128] [--source crates/distill-kernels/src/cuda/flash_attention.cu ...]
        [--json rows.jsonl]

distill's kernels are compiled from their source by NVRTC (through CuPy, as distill compiles
them through cudarc) and launched as `crates/distill-kernels/src/cuda/flash.rs` launches them:
the same grid, block and shared memory, and the same work around them (delta = rowsum(dO * O)
before the backward, the per-query-head dK/dV summed over each K/V head's group after it), so
the time is the time distill's attention takes. Several --source files run side by side
(a kernel being changed against the committed one) on the same inputs.

Every implementation is first checked against SDPA's math backend in f32 on the same inputs
(output and the three gradients; bf16 rounding bounds the error). TFLOP/s count the causal
half: forward 2 * 2 * B * H * T^2 / 2 * hd, backward 2.5 times that, as FlashAttention's
benchmarks count them.
"""

import argparse
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_SOURCE = os.path.join(ROOT, "crates/distill-kernels/src/cuda/flash_attention.cu")
TILE, THREADS = 64, 128
# Shared-memory tiles of [TILE, hd + 8] bf16 per CTA of flash_fwd, flash_bwd_dq and
# flash_bwd_dkdv, and the queries of a forward CTA, as flash.rs launches them.
TILES = (6, 4, 6)
FWD_ROWS = 2 * TILE


def smem(hd, tiles):
    return tiles * TILE * (hd + 8) * 2


class Distill:
    """distill's three kernels from one source file, launched as flash.rs launches them."""

    def __init__(self, spec, hd):
        import cupy

        path, _, launch = spec.partition(":")
        tiles, _, rows = launch.partition(":")
        self.name = os.path.relpath(path, ROOT)
        src = open(path).read()
        self.module = cupy.RawModule(code=src, options=(f"-DHD={hd}", "-std=c++17"))
        self.fwd = self.module.get_function("flash_fwd")
        self.dq = self.module.get_function("flash_bwd_dq")
        self.dkdv = self.module.get_function("flash_bwd_dkdv")
        # The delta and group-sum kernels, where the source has them (else PyTorch does it,
        # as distill did before them).
        self.delta = self.sum_groups = None
        if "flash_delta" in src:
            self.delta = self.module.get_function("flash_delta")
            self.sum_groups = self.module.get_function("flash_sum_groups")
        tiles = tuple(int(x) for x in tiles.split(",")) if tiles else TILES
        self.fwd_tiles, self.dq_tiles, self.dkdv_tiles = tiles
        self.fwd_rows = int(rows) if rows else FWD_ROWS
        for f, n in zip((self.fwd, self.dq, self.dkdv), tiles):
            f.max_dynamic_shared_size_bytes = smem(hd, n)

    @staticmethod
    def _strided(t):
        s = t.stride()
        return [np.uint64(t.data_ptr()), np.int64(s[0]), np.int64(s[1]), np.int64(s[2])]

    def _tail(self, lo, hi, heads, groups, t, s, scale):
        return [
            np.uint64(lo.data_ptr()),
            np.uint64(hi.data_ptr()),
            np.int32(0),
            np.int32(heads),
            np.int32(groups),
            np.int32(t),
            np.int32(s),
            np.float32(scale),
        ]

    def forward(self, q, k, v, lo, hi):
        """q [B, H, T, hd], k/v [B, KV, S, hd] -> out [B, H, T, hd] (a view of [B, T, H, hd]), lse."""
        b, h, t, hd = q.shape
        kv, s = k.shape[1], k.shape[2]
        out = torch.empty(b, t, h, hd, device=q.device, dtype=torch.bfloat16).transpose(1, 2)
        lse = torch.empty(b, h, t, 1, device=q.device, dtype=torch.float32)
        args = self._strided(q) + self._strided(k) + self._strided(v) + self._strided(out)
        args += [np.uint64(lse.data_ptr())] + self._tail(lo, hi, h, h // kv, t, s, 1 / math.sqrt(hd))
        grid = (math.ceil(t / self.fwd_rows), h, b)
        self.fwd(grid, (THREADS,), tuple(args), shared_mem=smem(hd, self.fwd_tiles))
        return out, lse

    def backward(self, q, k, v, lo, hi, out, lse, dout):
        b, h, t, hd = q.shape
        kv, s = k.shape[1], k.shape[2]
        groups = h // kv
        delta = torch.empty(b, h, t, device=q.device, dtype=torch.float32)
        if self.delta is not None:
            args = self._strided(out) + self._strided(dout) + [np.uint64(delta.data_ptr()), np.int32(h), np.int32(t)]
            self.delta((math.ceil(t / 4), h, b), (THREADS,), tuple(args))
        else:
            delta = (dout.float() * out.float()).sum(-1).contiguous()
        dq = torch.empty(b, t, h, hd, device=q.device, dtype=torch.bfloat16).transpose(1, 2)
        dk = torch.empty(b, h, s, hd, device=q.device, dtype=torch.float32)
        dv = torch.empty_like(dk)
        common = self._strided(q) + self._strided(k) + self._strided(v) + self._strided(dout)
        common += [np.uint64(lse.data_ptr()), np.uint64(delta.data_ptr())]
        tail = self._tail(lo, hi, h, groups, t, s, 1 / math.sqrt(hd))
        self.dq(
            (math.ceil(t / TILE), h, b),
            (THREADS,),
            tuple(common + self._strided(dq) + tail),
            shared_mem=smem(hd, self.dq_tiles),
        )
        self.dkdv(
            (math.ceil(s / TILE), h, b),
            (THREADS,),
            tuple(common + self._strided(dk) + self._strided(dv) + tail),
            shared_mem=smem(hd, self.dkdv_tiles),
        )
        if self.sum_groups is None:
            dk = dk.view(b, kv, groups, s, hd).sum(2).to(torch.bfloat16)
            dv = dv.view(b, kv, groups, s, hd).sum(2).to(torch.bfloat16)
            return dq, dk, dv
        quads, rows = b * kv * s * hd // 4, s * hd // 4
        summed = []
        for part in (dk, dv):
            dst = torch.empty(b, kv, s, hd, device=q.device, dtype=torch.bfloat16)
            args = (np.uint64(part.data_ptr()), np.uint64(dst.data_ptr()), np.int64(quads), np.int32(groups), np.int64(rows))
            self.sum_groups((min(math.ceil(quads / 256), 1 << 16),), (256,), args)
            summed.append(dst)
        return dq, summed[0], summed[1]


def sdpa(backend, q, k, v):
    with sdpa_kernel([backend]):
        gqa = k.shape[1] != q.shape[1]
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)


def expand(x, groups):
    return x.repeat_interleave(groups, dim=1) if groups > 1 else x


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def max_rel_err(ours, ref):
    ours, ref = ours.float(), ref.float()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq", default="2048,8192,16384,32768")
    ap.add_argument("--batch-tokens", type=int, default=0, help="B = max(1, this / T); 0: B = 1")
    ap.add_argument("--config", help="a directory with a Hugging Face config.json: its heads (else the three below)")
    ap.add_argument("--heads", type=int, default=28)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument(
        "--source",
        action="append",
        help="flash_attention.cu to time, optionally with its launch: PATH[:FWD,DQ,DKDV tiles[:FWD_ROWS]] "
        "(repeatable; 0221af8's source, a forward of 64 queries a CTA, is PATH:4,4,6:64)",
    )
    ap.add_argument("--no-torch", action="store_true", help="distill's kernels only")
    ap.add_argument("--no-distill", action="store_true", help="SDPA's backends only (`distill bench attention` times distill)")
    ap.add_argument("--check-max-seq", type=int, default=4096, help="check values up to this T")
    ap.add_argument("--iters", type=int, default=0, help="0: about 1 s of work per case")
    ap.add_argument("--json", help="append a row per (implementation, T) here")
    args = ap.parse_args()

    dev = torch.device("cuda")
    h, kv, hd = args.heads, args.kv_heads, args.head_dim
    if args.config:
        c = json.load(open(os.path.join(args.config, "config.json")))
        h, kv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
        hd = c.get("head_dim") or c["hidden_size"] // h
    groups = h // kv
    ours = [] if args.no_distill else [Distill(p, hd) for p in (args.source or [DEFAULT_SOURCE])]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print(f"# {h} query / {kv} KV heads of {hd}, causal, bf16; TFLOP/s count the causal half")
    print("| T | B | implementation | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | max rel err (out, dq, dk, dv) |")
    print("|---|---|---|---|---|---|---|---|")
    for t in (int(x) for x in args.seq.split(",")):
        b = max(1, args.batch_tokens // t) if args.batch_tokens else 1
        g = torch.Generator(device=dev).manual_seed(t)
        q = torch.randn(b, t, h, hd, device=dev, generator=g).to(torch.bfloat16).transpose(1, 2)
        k = torch.randn(b, t, kv, hd, device=dev, generator=g).to(torch.bfloat16).transpose(1, 2)
        v = torch.randn(b, t, kv, hd, device=dev, generator=g).to(torch.bfloat16).transpose(1, 2)
        dout = torch.randn(b, t, h, hd, device=dev, generator=g).to(torch.bfloat16).transpose(1, 2)
        lo = torch.zeros(1, t, device=dev, dtype=torch.int32)
        hi = torch.arange(t, device=dev, dtype=torch.int32).view(1, t)
        fwd_flops = 4 * b * h * t * t * hd / 2
        ref = None
        if t <= args.check_max_seq:
            qf, kf, vf = (x.float().requires_grad_() for x in (q, k, v))
            with sdpa_kernel([SDPBackend.MATH]):
                o = F.scaled_dot_product_attention(qf, expand(kf, groups), expand(vf, groups), is_causal=True)
            o.backward(dout.float())
            ref = (o.detach(), qf.grad, kf.grad, vf.grad)
            del qf, kf, vf, o

        impls = []
        for d in ours:
            def fwd(d=d):
                return d.forward(q, k, v, lo, hi)

            def step(d=d):
                o, lse = d.forward(q, k, v, lo, hi)
                return (o,) + d.backward(q, k, v, lo, hi, o, lse, dout)

            impls.append((f"distill ({d.name})", fwd, step))
        if not args.no_torch:
            for name, backend in (("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION), ("SDPA flash", SDPBackend.FLASH_ATTENTION)):
                qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
                try:
                    with torch.no_grad():
                        sdpa(backend, qg, kg, vg)
                except RuntimeError:
                    # A backend without grouped K/V heads gets them repeated, outside the timing.
                    kg, vg = (expand(x, groups).detach().requires_grad_() for x in (kg, vg))
                    name += " (K/V repeated)"

                def fwd(backend=backend, qg=qg, kg=kg, vg=vg):
                    with torch.no_grad():
                        return sdpa(backend, qg, kg, vg)

                def step(backend=backend, qg=qg, kg=kg, vg=vg, groups=groups if kg.shape[1] == h and groups > 1 else 1):
                    o = sdpa(backend, qg, kg, vg)
                    dq, dk, dv = torch.autograd.grad(o, (qg, kg, vg), dout)
                    if groups > 1:  # gradients of the repeated heads, summed back per K/V head
                        dk = dk.view(dk.shape[0], -1, groups, *dk.shape[2:]).sum(2)
                        dv = dv.view(dv.shape[0], -1, groups, *dv.shape[2:]).sum(2)
                    return o, dq, dk, dv

                impls.append((name, fwd, step))

        for name, fwd, step in impls:
            row = {"case": "attention", "impl": name, "seq": t, "batch": b, "heads": h, "kv_heads": kv, "head_dim": hd}
            try:
                err = "-"
                if ref is not None:
                    got = step()
                    err = ", ".join(f"{max_rel_err(x, r):.1e}" for x, r in zip(got, ref))
                    row["max_rel_err"] = [max_rel_err(x, r) for x, r in zip(got, ref)]
                    del got
                one = timed(step, 1, 1)
                iters = args.iters or max(3, min(50, int(1.0 / max(one, 1e-4))))
                tf = timed(fwd, 2, iters)
                ts = timed(step, 2, iters)
                row.update(fwd_s=tf, fwd_bwd_s=ts, fwd_tflops=fwd_flops / tf / 1e12, fwd_bwd_tflops=3.5 * fwd_flops / ts / 1e12)
                print(
                    f"| {t} | {b} | {name} | {tf * 1e3:.2f} | {row['fwd_tflops']:.0f} | {ts * 1e3:.2f} | "
                    f"{row['fwd_bwd_tflops']:.0f} | {err} |",
                    flush=True,
                )
            except Exception as e:  # a backend that cannot run this shape: say so, go on
                row["error"] = str(e).splitlines()[0][:200]
                print(f"| {t} | {b} | {name} | - | - | - | - | error: {row['error']} |", flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row) + "\n")
            torch.cuda.empty_cache()
        del ref


if __name__ == "__main__":
    sys.exit(main())
