#!/usr/bin/env bash
# On-policy distillation's step, split into sampling / teacher scoring / training, on the GPU
# machine: distill (`distill train` with [on_policy], metrics.jsonl) and the PyTorch anchor
# (pytorch_gkd.py: HF generate + PEFT + TRL's loss) at Qwen2.5-0.5B and -1.5B student shapes
# with a 1.5B teacher, 64 prompts a step, 256 new tokens a sample, random weights.
#
#   bash bench/on_policy/run.sh DISTILL_BINARY[.gz] TRL_GKD_TRAINER_PY
#
# Results under $OUT (or target/bench-on-policy): distill-*.jsonl, pytorch-*.jsonl, logs.
set -u -o pipefail
cd "$(dirname "$0")/../.."
bin="$1"; trl="$2"
out="${OUT:-target/bench-on-policy}"; mkdir -p "$out"
if [[ "$bin" == *.gz ]]; then gunzip -c "$bin" > /tmp/distill; chmod +x /tmp/distill; bin=/tmp/distill; fi
models=/tmp/onpolicy-models
students="${STUDENTS:-0.5b 1.5b}"
python3 bench/on_policy/make_models.py "$models" teacher-1.5b $(for s in $students; do echo student-$s; done) > "$out/make_models.log" 2>&1 || { cat "$out/make_models.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt"

for student in $students; do
  run=/tmp/onpolicy-run-$student
  rm -rf "$run"
  cat > /tmp/onpolicy-$student.toml <<TOML
name = "bench"
[teacher]
local_model = "$models/teacher-1.5b"
[student]
model = "$models/student-$student"
[data]
dataset = "tests/fixtures/dataset"
held_out = 0.1
[train]
out = "$run"
max_steps = ${STEPS:-4}
seq_len = 1024
micro_batch = 8
grad_accum = 8
lr = 1e-4
warmup_steps = 1
checkpoint_every = 1000
[lora]
enabled = true
r = 16
alpha = 32.0
[on_policy]
share = 1.0
divergence = "jsd"
beta = 1.0
temperature = 1.0
max_new_tokens = 256
gen_batch = 64
TOML
  start=$(date +%s)
  timeout ${LIMIT:-240} "$bin" --device cuda train --recipe /tmp/onpolicy-$student.toml > "$out/distill-$student.log" 2>&1
  echo "distill $student rc=$? $(( $(date +%s) - start ))s" | tee -a "$out/summary.txt"
  cp "$run/bench/runs/metrics.jsonl" "$out/distill-$student.jsonl" 2>/dev/null
  start=$(date +%s)
  timeout ${LIMIT:-240} python3 bench/on_policy/pytorch_gkd.py --student "$models/student-$student" \
    --teacher "$models/teacher-1.5b" --trl "$trl" --steps 3 --json "$out/pytorch-$student.jsonl" \
    > "$out/pytorch-$student.log" 2>&1
  echo "pytorch $student rc=$? $(( $(date +%s) - start ))s" | tee -a "$out/summary.txt"
done
tail -n 3 "$out"/*.jsonl
