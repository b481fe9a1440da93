#!/bin/bash
# A/B of the fine-tuning step cost of two source trees in one session: runs benchmarks/bench_finetune.py for the
# digits CNN alternately in BASE and in this tree, ROUNDS times, so that both see the same machine state (timings on a
# shared machine drift by tens of percent within an hour; compare ratios of the same round).
# usage: benchmarks/ab_finetune.sh BASE_TREE [ROUNDS=3] [MODEL=digits]   (e.g. BASE_TREE from `git worktree add`)
set -euo pipefail
base=${1:?usage: ab_finetune.sh BASE_TREE [ROUNDS] [MODEL]}
rounds=${2:-3}
model=${3:-digits}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
for _ in $(seq 1 "$rounds"); do
  for tree in "$base" "$here"; do
    row=$(cd "$tree" && PYTHONPATH="$tree" "$python" benchmarks/bench_finetune.py --models "$model" --steps 40 --repeats 3 2>/dev/null | grep "^| $model")
    echo "$tree $row"
  done
done
