#!/usr/bin/env bash
# The device check: one command for a lent GPU machine (about 8 minutes on one H200), its results under $OUT (or
# ./gpu_check_results). The machine has no network: the package runs from this working tree (PYTHONPATH) on the
# machine's own torch / transformers. Prints the environment, runs every `gpu`-marked test, then
# benchmarks/gpu_check.py (exactness incl. partial expert caches and disable_offload right after generate, host
# syncs per decode step, pinned and device memory against their budgets, throughput against pinned H2D bandwidth).
set -u
OUT="${OUT:-gpu_check_results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  nvidia-smi || true
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.is_available(), 'transformers', transformers.__version__)"
} > "$OUT/environment.txt" 2>&1
timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests: exit $?" | tee -a "$OUT/summary.txt"
timeout 240 python3 benchmarks/gpu_check.py --out "$OUT" > "$OUT/gpu_check.txt" 2>&1
echo "gpu_check.py: exit $?" | tee -a "$OUT/summary.txt"
tail -n 30 "$OUT/environment.txt" "$OUT/gpu_tests.txt" "$OUT/gpu_check.txt"
