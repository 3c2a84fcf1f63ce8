#!/usr/bin/env python3
"""Sets `distill bench` rows beside the PyTorch baseline's: one Markdown table per run.

    python3 bench/compare.py DISTILL.jsonl PYTORCH.jsonl [--liger LIGER.jsonl] [--unsloth UNSLOTH.jsonl]
        [--out TABLE.md]

With --liger (bench.py --liger's rows: PyTorch with Liger's kernels), its tok/s, peak and
distill's ratio to it get columns of their own; so do --unsloth's (bench.py --unsloth's rows:
LoRA and QLoRA training with Unsloth).

Rows match on (bench, model, case); B5 rows on (model, mode). MFU is recomputed for both
sides against one peak: the best GEMM either framework measured in the run (the peak case
and every B1 row: the device's demonstrated matmul peak), so the two MFU columns share a
denominator. The
`ratio` column is distill / PyTorch (tokens/s, or TFLOP/s for GEMMs; > 1 means distill is
faster).
"""

import argparse
import datetime
import json
import sys


def load(path):
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    rows.append(json.loads(line))
    except FileNotFoundError:
        print(f"warning: {path} not found", file=sys.stderr)
    return rows


def key(r):
    case = r.get("case", "")
    if r.get("bench") == "B5":
        case = case.split(" ")[0]
    return r.get("bench"), r.get("model"), case


def is_peak(r):
    return r.get("bench") in ("peak", "B1")


def num(r, k, prec=1):
    v = None if r is None else r.get(k)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return "FAILED" if (r is not None and "error" in r) else "-"
    if v != 0 and abs(v) < 1:
        return f"{v:.3f}"
    return f"{v:,.{prec}f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("distill")
    p.add_argument("pytorch")
    p.add_argument("--liger")
    p.add_argument("--unsloth")
    p.add_argument("--out")
    a = p.parse_args()
    ours, theirs = load(a.distill), load(a.pytorch)
    liger = load(a.liger) if a.liger else []
    unsloth = load(a.unsloth) if a.unsloth else []
    peaks = [r["tflops"] for r in ours + theirs if is_peak(r) and isinstance(r.get("tflops"), (int, float))]
    peak = max(peaks) if peaks else None
    by_key = {}
    order = []
    for side, rows in (("d", ours), ("t", theirs), ("l", liger), ("u", unsloth)):
        for r in rows:
            if r.get("bench") == "peak":
                continue
            k = key(r)
            if k not in by_key:
                by_key[k] = {}
                order.append(k)
            by_key[k][side] = r

    def first(field):
        for r in ours + theirs:
            if r.get(field):
                yield r.get("framework"), r[field]

    devices = sorted({v for _, v in first("device")})
    versions = {}
    for fw, v in first("version"):
        versions.setdefault(fw, v)
    for extra in (liger, unsloth):
        for r in extra:
            if r.get("version"):
                versions.setdefault(r.get("framework"), r["version"])
                break
    out = []
    out.append(f"### distill vs PyTorch, {datetime.date.today().isoformat()}, {', '.join(devices) or 'unknown device'}")
    out.append("")
    out.append("Versions: " + "; ".join(f"{v}" for v in versions.values()))
    if peak:
        out.append(f"Matmul peak for MFU: {peak:.4g} TFLOP/s (the best GEMM either framework measured in this run).")
    out.append("")

    def mfu(r):
        v = None if r is None else r.get("tflops")
        if not peak or not isinstance(v, (int, float)):
            return "-"
        return f"{v / peak:.3f}"

    def ratio(d, t, field):
        dv, tv = (None if x is None else x.get(field) for x in (d, t))
        if isinstance(dv, (int, float)) and isinstance(tv, (int, float)) and tv:
            return f"{dv / tv:.2f}"
        return "-"

    head = ("| bench | model | case | distill tok/s | PyTorch tok/s | ratio | distill TFLOP/s | PyTorch TFLOP/s "
            "| distill MFU | PyTorch MFU | distill peak GiB | PyTorch peak GiB |")
    rule = "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    if liger:
        head += " + Liger tok/s | ratio to Liger | + Liger peak GiB |"
        rule += "---:|---:|---:|"
    if unsloth:
        head += " Unsloth tok/s | ratio to Unsloth | Unsloth peak GiB |"
        rule += "---:|---:|---:|"
    out.append(head)
    out.append(rule)
    for k in order:
        if k[0] == "B5":
            continue
        d, t, lg, us = (by_key[k].get(side) for side in ("d", "t", "l", "u"))
        field = "tflops" if k[0] == "B1" else "tokens_per_s"
        case = str(k[2]).replace("|", "\\|")
        line = (f"| {k[0]} | {k[1]} | {case} | {num(d, 'tokens_per_s', 0)} | {num(t, 'tokens_per_s', 0)} "
                f"| {ratio(d, t, field)} | {num(d, 'tflops')} | {num(t, 'tflops')} | {mfu(d)} | {mfu(t)} "
                f"| {num(d, 'peak_gib', 2)} | {num(t, 'peak_gib', 2)} |")
        if liger:
            line += f" {num(lg, 'tokens_per_s', 0)} | {ratio(d, lg, field)} | {num(lg, 'peak_gib', 2)} |"
        if unsloth:
            line += f" {num(us, 'tokens_per_s', 0)} | {ratio(d, us, field)} | {num(us, 'peak_gib', 2)} |"
        out.append(line)
    b5 = [k for k in order if k[0] == "B5"]
    if b5:
        out.append("")
        out.append("| B5 memory envelope | cap | distill longest seq | PyTorch longest seq | distill peak GiB "
                   "| PyTorch peak GiB | static GiB (weights+grads+moments) | resolved (distill / PyTorch) |")
        out.append("|---|---:|---:|---:|---:|---:|---:|---|")
        for k in b5:
            d, t = by_key[k].get("d"), by_key[k].get("t")
            any_row = d or t
            out.append(f"| {k[1]} {any_row.get('case', '')} | {any_row.get('cap_gib', '-')} "
                       f"| {num(d, 'seq', 0)} | {num(t, 'seq', 0)} | {num(d, 'peak_gib', 2)} | {num(t, 'peak_gib', 2)} "
                       f"| {num(any_row, 'static_gib', 2)} "
                       f"| {(d or {}).get('resolved', '-')} / {(t or {}).get('resolved', '-')} |")
    out.append("")
    out.append("Peak memory: nvidia-smi memory.used high-water mark minus the value before the case started "
               "(20 ms polling, one process per case; includes the CUDA context).")
    text = "\n".join(out)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
