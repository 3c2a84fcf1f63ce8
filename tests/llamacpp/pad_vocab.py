#!/usr/bin/env python3
"""Copies a model directory with its embedding (and untied head) padded by --extra rows, as
Qwen2.5 pads its 151,665 tokens to 151,936 rows: the export then names those rows [PADn],
type UNUSED, as convert_hf_to_gguf.py does, which llama.cpp must load.

    pad_vocab.py tests/fixtures/tiny-qwen2 OUT_DIR [--extra 16]
"""
import argparse
import json
import shutil
import struct
from pathlib import Path

import numpy as np

PADDED = ("model.embed_tokens.weight", "lm_head.weight")


def read_safetensors(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n :]
    out = {}
    for name, t in header.items():
        assert t["dtype"] == "F32", f"{name}: {t['dtype']} (this helper reads F32 only)"
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(t["shape"])
    return out


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        b = np.ascontiguousarray(t, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--extra", type=int, default=16)
    args = p.parse_args()
    shutil.copytree(args.src, args.out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("reference.*"))
    tensors = read_safetensors(args.src / "model.safetensors")
    rng = np.random.default_rng(0)
    for name in PADDED:
        if name in tensors:
            t = tensors[name]
            tensors[name] = np.concatenate([t, rng.normal(0, 0.02, (args.extra, t.shape[1])).astype("<f4")])
    write_safetensors(args.out / "model.safetensors", tensors)
    config = json.loads((args.src / "config.json").read_text())
    config["vocab_size"] += args.extra
    (args.out / "config.json").write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    main()
