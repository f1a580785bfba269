#!/usr/bin/env bash
# The benchmark runs on the GPU machine, each part sized for ONE device call (600 s limit).
#
#   device run   carry: [".whl"]   timeout_s: 600   command: bash bench/run_gpu.sh [PART]
#
# PART (default quick):
#   quick           bench_train.py then bench_sampling.py with their defaults (both models, the
#                   diffusers twins, eager/graph/compile/compile-graph; compile at batch 512 for
#                   training and at the max-throughput batch for sampling).
#   train-more      training: compile-based modes at batch 128, then reduce-overhead at 512 (MNIST).
#   sampling-more   sampling: compile-based modes at batch 256 and reduce-overhead, no twin.
#   channels-last   eager and graph modes of both scripts with --channels-last (no compile, no twin).
#
# Every script stops starting cases when its --budget-s is spent and is killed by `timeout` past
# its hard limit; results are rewritten after every case, so a killed run keeps what it measured.
# Output: $OUT/<name>.json, .md and .log for each script run (6 files; the device returns <= 8).
set -uo pipefail
part=${1:-quick}
cd "$(dirname "$0")/.."
out=${OUT:-results/gpu}
mkdir -p "$out"

echo "== bench/run_gpu.sh $part: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(pwd)"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu \
  --format=csv,noheader || true

# diffusers is pure Python; everything it needs (torch, numpy, huggingface_hub, safetensors, regex,
# requests, filelock, pillow) is on the machine already (KINDS.md). Install only our wheel: other
# engineers' wheels in .whl/ must not take part.
if ls .whl/diffusers-*.whl >/dev/null 2>&1; then
  echo "== installing $(ls .whl/diffusers-*.whl) into /tmp/site"
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/diffusers-*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "!! diffusers did not install: the reference twins will be left out"
  fi
else
  echo "!! no .whl/diffusers-*.whl (carry .whl): the reference twins will be left out"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
# (versions, GPU and whether diffusers imported are in each JSON: environment, left_out)

# run NAME HARD_LIMIT_S SCRIPT ARGS...: one script under a hard time limit, output under $out.
run() {
  local name=$1 limit=$2 script=$3
  shift 3
  echo "== $name: python3 bench/$script $* (hard limit ${limit} s)"
  local t0=$SECONDS
  # BENCH_ARGS (unset on the device) appends arguments, e.g. "--device cpu --smoke" to try this file on a CPU
  timeout -k 10 "$limit" python3 "bench/$script" --out "$out/$name.json" --out-md "$out/$name.md" "$@" \
    ${BENCH_ARGS:-} 2>&1 | tee "$out/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

case $part in
  quick)
    run train 290 bench_train.py --budget-s 225
    run sampling 250 bench_sampling.py --budget-s 200
    ;;
  train-more)
    run train-b128-compile 330 bench_train.py --no-reference --modes compile,compile-graph \
      --batches 128 --compile-batches 128 --budget-s 270
    run train-reduce-overhead 220 bench_train.py --models mnist --no-reference --modes eager,reduce-overhead \
      --batches 512 --compile-batches 512 --budget-s 170
    ;;
  sampling-more)
    run sampling-b256-compile 540 bench_sampling.py --no-reference \
      --modes compile,compile-graph,reduce-overhead --compile-at batch --budget-s 470
    ;;
  channels-last)
    run train-cl 300 bench_train.py --no-reference --modes eager,graph --channels-last --budget-s 240
    run sampling-cl 240 bench_sampling.py --no-reference --modes eager,graph --channels-last --budget-s 190
    ;;
  *)
    echo "unknown part '$part': quick, train-more, sampling-more or channels-last" >&2
    exit 2
    ;;
esac

echo "== results (also in $out)"
for f in "$out"/*.md; do cat "$f"; echo; done
echo "== done after $SECONDS s"
