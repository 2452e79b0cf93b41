#!/usr/bin/env bash
# The device check: one command for a lent GPU machine (about 9 minutes on one H200), its results under $OUT (or
# ./gpu_check_results). The machine has no network: the package runs from this working tree (PYTHONPATH) on the
# machine's own torch / transformers. Prints the environment, runs every `gpu`-marked test, then
# benchmarks/gpu_check.py (exactness incl. partial expert caches and disable_offload right after generate, host
# syncs per decode step, pinned and device memory against their budgets, throughput against pinned H2D bandwidth).
#
# Issue 17's ten items, and where each is checked (CPU: tests/test_cuda_path.py, tests/test_offload_distributed.py):
#  1 expert cache from a byte budget      CPU: budget arithmetic; GPU: memory rows (max_memory_allocated vs budget)
#  2 exact-size pinned buffers             CPU: fake cudaHostRegister; GPU: memory rows (host_memory_stats, pinned)
#  3 one host transfer per MoE call        CPU: syncing ops counted per call; GPU: syncs rows (sync debug mode)
#  4 each rank stages/copies its share     CPU: 2 gloo processes on the staging path; GPU: -
#  5 LOCAL_RANK device default             CPU: resolve_execution_device under a fake 4-GPU torchrun
#  6 a failed read raises on every rank    CPU: 2 gloo processes, within seconds
#  7 misses first                          CPU: reader priorities and submission order; GPU: races (urgent stream)
#  8 256-byte aligned tensors              CPU: store offsets; GPU: exactness rows, gpu tests (bit-exact vs memory)
#  9 stalls timed with CUDA events         GPU: throughput rows (device_wait_fraction)
# 10 copy streams synchronised on close    GPU: exactness rows (disable_offload right after generate), races
#
# Issue 16 (low-bit stores): low_bit_exactness rows (offloaded 8/4-bit == dequantized_copy on the device: the CUDA
# dequantization equals the CPU's), low_bit_throughput rows (bf16 vs 8 vs 4 bits, dense and routed MoE, bytes per
# step and GB/s against the pinned H2D bandwidth), and the gpu tests of tests/test_offload_quantized.py (low-bit stores,
# and FP8 / MXFP4 checkpoints dequantized on the device against transformers' dequantized load moved to the GPU).
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
timeout 330 python3 benchmarks/gpu_check.py --out "$OUT" > "$OUT/gpu_check.txt" 2>&1
echo "gpu_check.py: exit $?" | tee -a "$OUT/summary.txt"
tail -n 30 "$OUT/environment.txt" "$OUT/gpu_tests.txt" "$OUT/gpu_check.txt"
