#!/usr/bin/env bash
# The GPU test suite on a machine without a Rust toolchain (the lent H100): build and pack
# the test binaries where cargo is, run them where the GPU is.
#
#   bash tests/gpu/run.sh pack DIR     # here: build the CUDA test binaries, strip and xz them into DIR
#   bash tests/gpu/run.sh run DIR      # on the GPU machine, from the repository root
#
# `run` starts every binary at once (one after another with SERIAL=1; only the tests whose
# names contain $FILTER where it is set) with
# DISTILL_REQUIRE_GPU=1 (a test that finds no GPU fails), cubecl's minimal autotune level, --test-threads ${THREADS:-2} and --nocapture (a
# failure's message is in the log as it happens, even if the binary is then stopped at its
# limit), each under a limit of ${LIMIT:-480} seconds. Logs (each line with the time it was printed, so a test's duration can be read off)
# and summary.txt go to ${OUT:-target/gpu-tests}.
set -u -o pipefail
cd "$(dirname "$0")/../.."
mode=${1:?pack or run}; dir=${2:?a directory}
crates=(-p distill-kernels -p distill-models -p distill-train)
case "$mode" in
pack)
  mkdir -p "$dir"
  cargo test --release --locked --features cuda "${crates[@]}" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' |
    while read -r exe; do
      name=$(basename "$exe" | sed 's/-[0-9a-f]*$//')
      # xz: a third smaller than gzip, which keeps the pack and a CLI under the device's carry limit.
      strip -o "$dir/$name" "$exe" && xz -9 -T0 -f "$dir/$name" && echo "$dir/$name.xz"
    done ;;
run)
  out=${OUT:-target/gpu-tests}; mkdir -p "$out" /tmp/gpu-tests
  export DISTILL_FIXTURES=$PWD/tests/fixtures DISTILL_REQUIRE_GPU=1
  # Coarser autotune keys (fewer tuning passes of burn's matmuls) for every binary, as the
  # kernels' tests already choose for themselves (tests/common): the checks are of results.
  export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/gpu.txt"
  # NCCL comes with PyTorch's wheels as libnccl.so.2; cudarc loads it as libnccl.so.
  nccl=$(python3 -c 'import nvidia.nccl as n; print(list(n.__path__)[0] + "/lib")' 2>/dev/null)
  if [ -e "$nccl/libnccl.so.2" ]; then
    mkdir -p /tmp/nccl-lib && ln -sf "$nccl/libnccl.so.2" /tmp/nccl-lib/libnccl.so
    export LD_LIBRARY_PATH=/tmp/nccl-lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
  # cuDNN too (libcudnn.so.9; cudarc tries that name): where it is found, the cuDNN attention
  # tests must run (DISTILL_REQUIRE_CUDNN=1) rather than skip.
  cudnn=$(python3 -c 'import nvidia.cudnn as n; print(list(n.__path__)[0] + "/lib")' 2>/dev/null)
  if [ -e "$cudnn/libcudnn.so.9" ]; then
    export LD_LIBRARY_PATH=$cudnn:$LD_LIBRARY_PATH DISTILL_REQUIRE_CUDNN=1
  fi
  for f in "$dir"/*.xz "$dir"/*.gz; do
    [ -e "$f" ] || continue
    b=/tmp/gpu-tests/$(basename "${f%.*}")
    case "$f" in
      # Python's lzma, where the machine has no xz.
      *.xz) xz -dc "$f" > "$b" 2>/dev/null || python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$f" "$b" ;;
      *) gunzip -c "$f" > "$b" ;;
    esac
    chmod +x "$b"
    ( start=$(date +%s)
      timeout "${LIMIT:-480}" "$b" ${FILTER:+"$FILTER"} --test-threads "${THREADS:-2}" --nocapture 2>&1 |
        while IFS= read -r line; do printf '%(%H:%M:%S)T %s\n' -1 "$line"; done > "$out/$(basename "$b").log"
      rc=${PIPESTATUS[0]}
      echo "$(basename "$b") rc=$rc $(( $(date +%s) - start ))s $(grep -E 'test result' "$out/$(basename "$b").log" | tail -1)" >> "$out/summary.txt" ) &
    # SERIAL=1: one binary at a time, each with the GPU to itself (all at once, the slow
    # ones can run out of their limit while the others compile and tune).
    [ "${SERIAL:-0}" = 1 ] && wait
  done
  wait
  cat "$out/gpu.txt" "$out/summary.txt"
  grep -h -E "FAILED|panicked|SKIPPED" "$out"/*.log | head -40
  ! grep -q -v " rc=0 " "$out/summary.txt" ;;
*) echo "usage: $0 pack|run DIR" >&2; exit 2 ;;
esac
