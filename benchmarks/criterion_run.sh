#!/usr/bin/env bash
# Issue 14's criterion rows in one device call, on an H200 only (the criterion names the H200; on another GPU this
# prints the GPU and exits 3 at once, so a call that got the wrong machine costs only its start).
#   HALF=plain (default): w4a8 fused, unwrapped, cat_gemms (the library's compile recipe), torchao fp8, bf16; compiled (the
#                         wrapped w4a8 row left out: with it bf16 ran past the call's budget on 2026-12-06)
#   HALF=ro:              the same under mode="reduce-overhead" (fp8's first call takes ~160 s: --timeout 250)
#   ANY_GPU=1:            run on whatever GPU came (for a same-run comparison that is not the criterion)
# Usage on the device: SVDQUANT_COMMIT=<hash> SVDQUANT_DIRTY=0 HALF=plain bash benchmarks/criterion_run.sh
set -u
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$gpu"
if [[ "$gpu" != *H200* && -z "${ANY_GPU:-}" ]]; then echo "not an H200: nothing run"; exit 3; fi
limit=${LIMIT:-585}
if [[ "${HALF:-plain}" == ro ]]; then
  configs=w4a8-compile-ro-fused-unwrap-cat,fp8-compile-ro,bf16-compile-ro; per=250
else
  configs=w4a8-compile-fused-unwrap-cat,fp8-compile,bf16-compile; per=200
fi
FLUX_ARGS="--configs $configs --tag criterion-${HALF:-plain} --timeout $per --budget $(( limit - 100 ))" \
  timeout "$limit" bash benchmarks/gpu_run.sh flux
