#!/usr/bin/env bash
# One device call's worth of GPU work (see benchmarks/NOTES_kernels.md): fresh JIT build, the GPU tests, then the
# timing steps named on the command line. Usage (from the repository root on the GPU machine):
#   bash benchmarks/gpu_run.sh tests gemm quantize full
#     tests     pytest tests/test_cuda_ops.py tests/test_cuda_model.py (fresh seed unless SVDQ_TEST_SEED is set)
#     gemm      bench_linear.py --gemm-only over $SCHEDULES (default promote,skeleton)
#     quantize  bench_linear.py --quantize-only
#     tiles     bench_linear.py --tile-overhead (GEMM kernel time split into per-tile fixed + per-stage cost)
#     full      bench_linear.py --out $OUT (the recorded table)
#     probe     benchmarks/probes/overlap_probe.cu: tensor-core vs FP32 promotion overlap (NOTES, session 4)
# torchao comes from a wheel carried in .whl/ (benchmarks need it for the fp8 baseline; see ../shared/tools/gpu-wheels).
set -euo pipefail
export PYTHONUNBUFFERED=1
export SVDQUANT_OPS_CACHE=${SVDQUANT_OPS_CACHE:-/tmp/svdq_cache_$$}
if ls .whl/torchao*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/torchao*.whl 2>/dev/null || true
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader || true
t0=$(date +%s)
python3 -c "import svdquant_ops, torch; print('build ok', torch.__version__)"
echo "build_s $(( $(date +%s) - t0 ))"
for step in "$@"; do
  case "$step" in
    tests) python3 -m pytest tests/test_cuda_ops.py tests/test_cuda_model.py -q -x -p no:cacheprovider ;;
    gemm) python3 benchmarks/bench_linear.py --gemm-only --schedules "${SCHEDULES:-promote,skeleton}" ${GEMM_ARGS:-} ;;
    quantize) python3 benchmarks/bench_linear.py --quantize-only ;;
    tiles) python3 benchmarks/bench_linear.py --tile-overhead ;;
    full) python3 benchmarks/bench_linear.py --out "${OUT:-benchmarks/results}" ${FULL_ARGS:-} ;;
    probe)
      inc=$(python3 -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
      nvcc -std=c++17 -O3 -arch=sm_90a $inc -I svdquant_ops/csrc --expt-relaxed-constexpr -diag-suppress 3306 \
        benchmarks/probes/overlap_probe.cu -o /tmp/overlap_probe -lcuda
      /tmp/overlap_probe ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
