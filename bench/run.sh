#!/usr/bin/env bash
# The issue #6 benchmark suite on the GPU machine: distill and the PyTorch baseline with the
# same arguments, stage by stage, then one side-by-side table.
#
#   bash bench/run.sh [--quick | --generation | --long] [--budget SECONDS] [--device cuda:N] DISTILL_BINARY[.gz]
#
# DISTILL_BINARY is a CUDA build of `distill` (`cargo build --release -p distill-cli
# --features cuda`), or that binary gzipped. Results go to $OUT (the device tool's output
# folder) or target/bench: distill.jsonl, pytorch.jsonl, table.md, and the logs.
#
# Full (default budget 540 s):                   Quick (--quick, budget 240 s):
#   B1 GEMMs at Qwen2.5-7B shapes                  B1 GEMMs at 0.5B shapes
#   B2 loss, vocab 151,936 (0.5B hidden)           B2 loss, vocab 151,936
#   B3 LoRA 0.5B, 1.5B, 7B (7B recomputes)         B3 LoRA 0.5B
#   B4 full fine-tune 0.5B, 1.5B                   B4 full fine-tune 0.5B
#   B6 generate 0.5B bs1/bs64, 7B bs1/bs16         B6 generate 0.5B bs1/bs64
#   B5 7B LoRA under 24 GiB, 1.5B full under 12 GiB
# Generation (--generation, budget 540 s): B6 alone, the generation issue's rows: batch 1, 16,
# 64 and 256 at 0.5B, 1.5B and 7B (greedy, 128 -> 256 tokens), 0.5B sampled at batch 64
# (T 1), 64 samples of one prompt (0.5B, T 0.6, top-p 0.95), and 4,096 new tokens (0.5B bs1
# and bs16); HF generate beside each (at 7B, batch 1 and 64). GEN_PART=1 runs the greedy grid,
# GEN_PART=2 the rest: the whole of it takes more than one device call.
# Long context (--long, budget 540 s), R1's trace lengths: attention alone at 7B's heads
# (distill, and PyTorch SDPA's cuDNN and flash backends) at 2k-32k; B3 7B and 1.5B LoRA at 1 x 16,384
# and 1 x 32,768 (recompute); B5 7B QLoRA under 12 and 24 GiB, 7B bf16 LoRA under 24 GiB and
# 1.5B full fine-tuning under 24 GiB (distill with its block inputs, and for full
# fine-tuning its optimizer state, in host memory).
# Each stage runs distill, then PyTorch, each under a time limit taken from what is left of
# the budget; a stage cut short keeps the rows it finished (rows are written as they come).
# Training stages run PyTorch a second time with Liger's kernels (bench.py --liger) when
# liger_kernel imports (carry its wheel: docs/PERFORMANCE.md), unless LIGER=0; table.md then
# has their columns too. LoRA training stages (lora, train, B3) also run the Unsloth twin
# (bench.py --unsloth: Unsloth's FastLanguageModel, LoRA and QLoRA only) when unsloth imports
# with a GPU, unless UNSLOTH=0: rows in unsloth.jsonl, columns in table.md. Opt-in: where
# `import unsloth` fails and a folder .whl-unsloth/ (Unsloth's wheels and its missing
# dependencies, carried) is in the checkout, they are installed (pip --no-index --no-deps
# --target) into a temporary folder that is put on PYTHONPATH for the Unsloth twin's runs
# alone: the wheels shadow packages (fsspec, datasets) the other runs keep. The twin saves a
# random-init checkpoint per config under $UNSLOTH_TWIN_CACHE (default
# /tmp/distill-unsloth-models), reused by later runs on the same machine.
set -u -o pipefail

quick=0
budget=""
device="cuda"
bin=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --generation) quick=gen ;;
    --long) quick=long ;;
    --budget) budget="$2"; shift ;;
    --device) device="$2"; shift ;;
    -h|--help) sed -n '2,40p' "$0"; exit 0 ;;
    *) bin="$1" ;;
  esac
  shift
done
if [ -z "$bin" ]; then
  echo "usage: bash bench/run.sh [--quick] [--budget SECONDS] DISTILL_BINARY[.gz]" >&2
  exit 2
fi
[ -n "$budget" ] || budget=$([ "$quick" = 1 ] && echo 240 || echo 540)  # --generation and --long: 540
[ -f "$bin" ] || { echo "no such file: $bin" >&2; exit 2; }
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"

cd "$(dirname "$0")/.."
out="${OUT:-target/bench}"
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
case "$bin" in
  *.gz) gunzip -c "$bin" > "$work/distill" ;;
  *) cp "$bin" "$work/distill" ;;
esac
chmod +x "$work/distill"
distill="$work/distill"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
py="${PYTHON:-python3}"
# distill's training attention runs on cuDNN where libcudnn.so.9 loads: PyTorch's wheels
# bring it (nvidia-cudnn); without it on the loader's path distill uses its flash kernels.
cudnn=$("$py" -c 'import nvidia.cudnn as n; print(list(n.__path__)[0] + "/lib")' 2>/dev/null)
if [ -e "$cudnn/libcudnn.so.9" ]; then
  export LD_LIBRARY_PATH=$cudnn${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
else
  cudnn=""
fi

cfg=bench/configs
s05="--config $cfg/qwen2.5-0.5b"
s15="--config $cfg/qwen2.5-1.5b"
s7="--config $cfg/qwen2.5-7b"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$py" -c 'import torch, transformers, peft; print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, "| peft", peft.__version__)' 2>&1 | tail -1
  "$distill" --version
  echo "cuDNN for distill's training attention: ${cudnn:-not found (the flash kernels)}"
} | tee "$out/env.txt"

liger=0
if [ "${LIGER:-1}" != 0 ] && "$py" -c 'import liger_kernel' 2>/dev/null; then liger=1; fi
echo "Liger twin: $([ $liger = 1 ] && echo on || echo "off (LIGER=0, or liger_kernel does not import)")" | tee -a "$out/env.txt"

# The Unsloth twin: on where unsloth imports on its GPU path (without a GPU it imports its CPU
# backend, or raises: off either way), from the environment or else from .whl-unsloth's wheels.
# Its output goes to .txt files: the closing scan of *.log would show a missing unsloth as an error.
unsloth=0
unsloth_pythonpath="${PYTHONPATH:-}"
unsloth_from="the environment"
unsloth_probe='import sys, torch, unsloth; sys.exit(0 if torch.cuda.is_available() and not getattr(unsloth, "_IS_CPU_BACKEND", False) else 1)'
if [ "${UNSLOTH:-1}" != 0 ]; then
  if "$py" -c "$unsloth_probe" > "$out/unsloth-probe.txt" 2>&1; then
    unsloth=1
  elif [ -d .whl-unsloth ]; then
    site="$work/unsloth-site"
    if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
         .whl-unsloth/*.whl > "$out/unsloth-install.txt" 2>&1 \
       && PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" "$py" -c "$unsloth_probe" > "$out/unsloth-probe.txt" 2>&1; then
      unsloth=1
      unsloth_pythonpath="$site${PYTHONPATH:+:$PYTHONPATH}"
      unsloth_from=".whl-unsloth, installed into $site"
    fi
  fi
fi
echo "Unsloth twin: $([ $unsloth = 1 ] && echo "on (unsloth from $unsloth_from)" || echo "off (UNSLOTH=0, or unsloth does not import with a GPU: unsloth-probe.txt)")" | tee -a "$out/env.txt"

start=$SECONDS
peak_d=""
peak_t=""
n=0

# stage NAME CAP_SECONDS ARGS...: distill then PyTorch (and for training, PyTorch + Liger, and
# for LoRA training, Unsloth) with the same ARGS; `dx="..." stage ...` adds arguments for
# distill alone (its memory knobs, which the PyTorch twin does not have), `tx="..."` for the
# twins alone (a later argument wins: fewer of HF generate's slow cases).
stage() {
  local name="$1" cap="$2"; shift 2
  n=$((n + 1))
  local left=$((budget - (SECONDS - start)))
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped, ${left}s of the budget left" | tee -a "$out/skipped.txt"
    return
  fi
  local t=$(( left / 2 < cap ? left / 2 : cap ))
  local tag; tag=$(printf '%02d-%s' "$n" "$name")
  echo "== $name (distill, limit ${t}s): $*"
  timeout -k 10 "$t" "$distill" --device "$device" bench "$@" ${dx:-} ${peak_d:+--peak-tflops $peak_d} \
    --json "$out/d-$tag.jsonl" > "$out/d-$tag.log" 2>&1
  echo "   exit $? after $((SECONDS - start))s; $(wc -l < "$out/d-$tag.jsonl" 2>/dev/null || echo 0) rows"
  twin t PyTorch "$@"
  case "$1" in lora|full|train|B3|B4) ;; *) return ;; esac
  if [ "$liger" = 1 ]; then twin l "PyTorch + Liger" "$@" --liger; fi
  # Full fine-tuning alone (full, B4) would give the Unsloth twin nothing but "not run" rows.
  case "$1" in full|B4) return ;; esac
  if [ "$unsloth" = 1 ]; then PYTHONPATH="$unsloth_pythonpath" twin u Unsloth "$@" --unsloth; fi
}

# twin PREFIX LABEL ARGS...: the PyTorch side of the current stage (uses stage's locals).
twin() {
  local prefix="$1" label="$2"; shift 2
  local left=$((budget - (SECONDS - start)))
  local t=$(( left < cap ? left : cap ))
  if [ "$t" -lt 15 ]; then
    echo "   $label skipped: ${left}s left" | tee -a "$out/skipped.txt"
    return
  fi
  echo "== $name ($label, limit ${t}s)"
  timeout -k 10 "$t" "$py" bench/pytorch/bench.py --device "$device" "$@" ${tx:-} ${peak_t:+--peak-tflops $peak_t} \
    --json "$out/$prefix-$tag.jsonl" > "$out/$prefix-$tag.log" 2>&1
  echo "   exit $? after $((SECONDS - start))s; $(wc -l < "$out/$prefix-$tag.jsonl" 2>/dev/null || echo 0) rows"
}

# The matmul peak each side measured in the first stage, passed on so later stages skip it.
peak_of() {
  "$py" - "$1" <<'EOF'
import json, sys
best = 0.0
try:
    for line in open(sys.argv[1]):
        r = json.loads(line)
        if r.get("bench") == "peak" and isinstance(r.get("tflops"), (int, float)):
            best = max(best, r["tflops"])
except OSError:
    pass
print(f"{best:.3f}" if best > 0 else "")
EOF
}

common_args="--batch 4 --seq 2048 --warmup 2 --steps 3"
if [ "$quick" = gen ]; then
  # HF generate runs each case in a child with its own start-up (7B: about 50 s of it), so
  # its 7B twin takes batch 1 and 64 only; GEN_PART=1 or 2 runs half the grid, for two calls.
  part=${GEN_PART:-0}
  if [ "$part" != 2 ]; then
    stage generate-0.5b 100 generate $s05 --gen-batch 1,16,64,256 --warmup 1
    stage generate-1.5b 100 generate $s15 --gen-batch 1,16,64,256 --warmup 1
    tx="--gen-batch 1,64" stage generate-7b 150 generate $s7 --gen-batch 1,16,64,256 --warmup 1
  fi
  if [ "$part" != 1 ]; then
    stage sampled-0.5b 40 generate $s05 --gen-batch 64 --gen-temperature 1.0 --warmup 1
    stage samples-of-one-prompt 40 generate $s05 --gen-batch 64 --gen-samples 64 --gen-temperature 0.6 --gen-top-p 0.95 --warmup 1
    stage long-0.5b 120 generate $s05 --gen-batch 1,16 --new-tokens 4096 --warmup 0
  fi
elif [ "$quick" = long ]; then
  # Attention alone at 7B's heads: distill's training attention (cuDNN where it loads, else its
  # flash kernels) through `distill bench attention`, then
  # PyTorch SDPA's cuDNN and FlashAttention-2 backends (bench/attention/attention.py).
  n=$((n + 1)); tag=$(printf '%02d-attention' "$n")
  echo "== attention (distill, limit 90s)"
  timeout -k 10 90 "$distill" --device "$device" bench attention $s7 --warmup 2 --iters 5 \
    --json "$out/d-$tag.jsonl" > "$out/d-$tag.log" 2>&1
  echo "   exit $? after $((SECONDS - start))s"
  echo "== attention (PyTorch SDPA, limit 120s)"
  timeout -k 10 120 "$py" bench/attention/attention.py --config $cfg/qwen2.5-7b --no-distill \
    --json "$out/sdpa-$tag.jsonl" > "$out/sdpa-$tag.md" 2>&1
  echo "   exit $? after $((SECONDS - start))s"; cat "$out/sdpa-$tag.md"
  long_args="--batch 1 --warmup 1 --steps 2 --recompute on"
  stage lora-16k 150 lora $s7 $s15 $long_args --seq 16384
  stage lora-32k 150 lora $s7 $s15 $long_args --seq 32768
  # distill parks the block inputs (and for full fine-tuning AdamW's moments) in host memory;
  # PyTorch's gradient checkpointing keeps its inputs on the GPU.
  parked="--offload-block-inputs --mlp-chunk-tokens 4096"
  dx="$parked" stage memory-7b-qlora-12 100 memory $s7 --mem-mode lora --quantize nf4 --mem-cap-gib 12 --mem-start 16384 --mem-step 2048 --mem-budget-s 90
  dx="$parked" stage memory-7b-qlora-24 100 memory $s7 --mem-mode lora --quantize nf4 --mem-cap-gib 24 --mem-start 65536 --mem-max 131072 --mem-step 8192 --mem-budget-s 90
  dx="$parked" stage memory-7b-lora-24 100 memory $s7 --mem-mode lora --mem-cap-gib 24 --mem-start 32768 --mem-max 131072 --mem-step 4096 --mem-budget-s 90
  dx="$parked --offload-optimizer" stage memory-1.5b-full-24 60 memory $s15 --mem-mode full --mem-cap-gib 24 --mem-start 8192 --mem-step 4096 --mem-budget-s 50
elif [ "$quick" = 1 ]; then
  stage gemm 60 gemm $s05 --iters 10
  peak_d=$(peak_of "$out/d-01-gemm.jsonl"); peak_t=$(peak_of "$out/t-01-gemm.jsonl")
  stage loss 40 loss $s05 --iters 5
  stage train-0.5b 60 train $s05 $common_args
  stage generate-0.5b 60 generate $s05 --gen-batch 1,64 --warmup 1
else
  stage gemm 60 gemm $s7 --iters 10
  peak_d=$(peak_of "$out/d-01-gemm.jsonl"); peak_t=$(peak_of "$out/t-01-gemm.jsonl")
  stage loss 40 loss $s05 --iters 5
  stage lora 150 lora $s05 $s15 $s7 $common_args
  # QLoRA (NF4 base): PyTorch's side needs bitsandbytes; without it that side has no row.
  stage qlora-7b 80 lora $s7 $common_args --quantize nf4
  stage full 80 full $s05 $s15 $common_args
  stage generate 100 generate $s05 --gen-batch 1,64 --warmup 1
  stage generate-7b 80 generate $s7 --gen-batch 1,16 --warmup 1
  stage memory-7b-lora 90 memory $s7 --mem-mode lora --mem-cap-gib 24 --mem-start 4096 --mem-step 1024 --mem-budget-s 75
  stage memory-1.5b-full 40 memory $s15 --mem-mode full --mem-cap-gib 12 --mem-start 2048 --mem-step 1024 --mem-budget-s 30
fi

cat "$out"/d-*.jsonl > "$out/distill.jsonl" 2>/dev/null
cat "$out"/t-*.jsonl > "$out/pytorch.jsonl" 2>/dev/null
cat "$out"/l-*.jsonl > "$out/liger.jsonl" 2>/dev/null
cat "$out"/u-*.jsonl > "$out/unsloth.jsonl" 2>/dev/null
echo
"$py" bench/compare.py "$out/distill.jsonl" "$out/pytorch.jsonl" --out "$out/table.md" \
  $([ -s "$out/liger.jsonl" ] && echo --liger "$out/liger.jsonl") \
  $([ -s "$out/unsloth.jsonl" ] && echo --unsloth "$out/unsloth.jsonl")
echo
echo "total $((SECONDS - start))s; logs and rows in $out"
for f in "$out"/*.log; do
  if grep -qiE "panicked|Traceback|error" "$f"; then
    echo "--- $f (tail)"
    tail -n 8 "$f"
  fi
done
