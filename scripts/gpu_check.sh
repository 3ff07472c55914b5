#!/usr/bin/env bash
# The GPU check of issue 32: where torch sees a CUDA GPU, run
#   1. the tests marked `gpu` (tests/test_gpu.py: a tiny-SD3 dense run on CUDA in bf16 with micro-batches,
#      chunks and gradient checkpointing; micro-batched gradients against the whole minibatch's; the peak of
#      one dense iteration against the batch; the CUDA peak meter),
#   2. benchmarks/bench_memory.py on CUDA (SD3.5-M-sized random weights, every size measured at 512 px),
#   3. benchmarks/bench_memory_growth.py on CUDA (one dense iteration at batch 8 and 32),
# and print what they measured. Without a CUDA GPU it says so and exits 0, having run nothing heavy.
# Sized for one H100: about 5 minutes (the time limits below stop it at 8).
#
#   bash scripts/gpu_check.sh               # results in benchmarks/results/memory/*-cuda.*
#   OUT=/some/folder bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: torch sees no CUDA GPU here; nothing was run (the CPU test suite covers the rest)."
    exit 0
fi

out="${OUT:-benchmarks/results/memory}"
mkdir -p "$out"
python3 -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"gpu_check: {p.name}, {p.total_memory / 2**30:.1f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")'
status=0

echo "== 1/3 tests marked gpu"
timeout 240 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -rA || status=1

echo "== 2/3 bench_memory.py --device cuda"
timeout 180 python3 benchmarks/bench_memory.py --device cuda --out "$out" || status=1

echo "== 3/3 bench_memory_growth.py --device cuda (batch 8 and 32, micro_batch_size 2, chunk_size 4)"
timeout 120 python3 benchmarks/bench_memory_growth.py --device cuda --batch 8 --micro-batch-size 2 --chunk-size 4 --out "$out" || status=1

echo "gpu_check: done, exit status $status; results in $out"
exit "$status"
