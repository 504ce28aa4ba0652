#!/usr/bin/env bash
# One device call's worth of GPU work (benchmarks/README.md): JIT build (or the carried cache, below), the GPU
# tests, then the timing steps named on the command line. Usage (from the repository root on the GPU machine):
#   SVDQUANT_COMMIT=<full hash> SVDQUANT_DIRTY=<0|1> bash benchmarks/gpu_run.sh tests gemm quantize full
#     tests     pytest tests/test_cuda_*.py, tests/test_sharing.py and tests/test_lora.py (their move tests have CUDA
#               cases), tests/test_gemm_cat.py, and tests/test_op_errors.py (every C++ error message as this
#               machine's compiler builds the library); fresh seed unless SVDQ_TEST_SEED is set; or the files in
#               TEST_FILES (the default set's 321 tests took 333 s on 2026-12-05; on 2026-12-07 it reached ~78 % in 455 s,
#               so split it over two calls, or set TESTS_S to skip what would start after that many seconds)
#     gemm      bench_linear.py --gemm-only over $SCHEDULES (default promote,skeleton)            [diagnostics build]
#     quantize  bench_linear.py --quantize-only ([diagnostics build] when SVDQUANT_OPS_QA_CFG / _QA_SPLITS are set)
#     gmaxab    bench_linear.py --gmax-ab: W4A8 quantize_act on a FLUX.1 step's input shapes, the pipelined group-max
#               kernel against the register-prefetch one (SVDQUANT_OPS_CUDA_W4A8_GMAX=pipe / regs): equal codes and scales,
#               per-shape and per-step times
#     tokenab   bench_linear.py --token-ab: W4A8 quantize_act on a FLUX.1 step's input shapes, the token kernel
#               with its K split where M is small off and on (SVDQUANT_OPS_CUDA_W4A8_TOKEN_SPLIT=0 / 1): equal
#               outputs, per-shape and per-step times
#     clusterab bench_linear.py --cluster-ab, then --quantize-only --precision w4a8 --tokens 512: W4A8 quantize_act on
#               a FLUX.1 step's input shapes, the two passes against the one-pass cluster kernel
#               (SVDQUANT_OPS_CUDA_W4A8_CLUSTER unset / 1): equal codes and scales, per-shape and per-step times with
#               the 512-token calls apart; then at M = 512 the given-amax op and Inductor's amax (issue 14's small M)
#     pairab    bench_linear.py --pair-ab: a FLUX.1 double block's image (M = 4096) and text (M = 512) linear pairs,
#               W4A8 and bf16, one after the other against the text linear on a second CUDA stream (the text
#               stream's marginal cost: issue 14 item 4's second lever), through parallel_linears, and with 8 / 16 /
#               24 SMs set aside for the text linear (SVDQUANT_OPS_CUDA_PARALLEL_SMS)
#     qastep    bench_linear.py --qa-step: W4A8 quantize_act on a FLUX.1 step's inputs, per call and per step by
#               kernel; with QA_BASELINE_TREE (another version's svdquant_ops, e.g. `git archive <commit> svdquant_ops`
#               unpacked under .gpucache/ and its library in the carried cache) its runs alternate with this tree's
#               (QA_ROUNDS, default 2) and this tree's codes are compared with the baseline's
#     tiles     bench_linear.py --tile-overhead (GEMM kernel time split into per-tile fixed + per-stage cost; W4A8
#               also with half the operand feed, SVDQUANT_OPS_GEMM_SCHEDULE=halffeed / halffeed-act, and rings of
#               4 / 5 / 7 stages)                                                                 [diagnostics build]
#     ring      the diagnostics build alone, then bench_linear.py --tile-overhead --tile-w4a8-only (W4A8's per-stage
#               cost with rings of 4 / 5 / 6 / 7 stages: latency-bound or throughput-bound; halffeed and its mirror
#               halffeed-act: the bytes or the operand); the bit-equality check of a ring is
#               SVDQUANT_OPS_DIAGNOSTICS=1 bench_linear.py --schedule-ab ring5                [diagnostics build]
#     ncu       the diagnostics build alone, then Nsight Compute on one W4A8 GEMM per schedule in NCU_SCHEDULES
#               (default promote halffeed ring7) and on torchao's fp8 GEMM (cuBLAS), at NCU_SHAPE (default
#               4096,9216,3072): speed of light, warp stall reasons, shared-memory bank use; $OUT/ncu_*.txt
#                                                                                                 [diagnostics build]
#     overlap   bench_linear.py --overlap: W4A8 gemm, shipped schedule vs SVDQUANT_OPS_GEMM_SCHEDULE=overlap and
#               overlap3 (epilogue under the next tile's MMAs, 2 / 3 stages in flight; bit-equal check), pingpong
#               (whole tiles per consumer warpgroup; within fp32 rounding), promote-cvt (the int32 sums converted
#               by a magic-number add; bit-equal) and inflight (one stage of MMAs in flight; bit-equal), and times;
#               GEMM_ARGS=--quick: 2 shapes, fp32 output and saturated rows                     [diagnostics build]
#     tileab    bench_linear.py --tile-ab: W4A8 gemm on a FLUX.1 step's GEMMs on 128 x 128 against 128 x 256 tiles
#               and the library's per-call choice (SVDQUANT_OPS_CUDA_W4A8_TILE=128 / 256 / auto): outputs compared,
#               per-call and per-step times
#     weightsab bench_linear.py --weights-ab: W4A8 gemm on a FLUX.1 step's GEMMs at 1024x1024 and 512x512, weights
#               expanded by the prep kernel against packed weights expanded in registers (SVDQUANT_OPS_CUDA_W4A8_WEIGHTS=
#               prep / regs): outputs compared, per-call and per-step times
#     expandbw  bench_linear.py --expand-bw: W4A8's weight expansion (expand_w4a8_weight) on the weights a FLUX.1
#               step's prep expands, by lane pairs and warp-uniform (SVDQUANT_OPS_CUDA_W4A8_EXPAND=pair / warp,
#               equal bytes checked), against a device-to-device copy: GB/s per shape, ms per step at each
#     qakeep    probes/qa_sweep.py on the FLUX.1 inputs W4A8's group-max pass streams (x over half of L2: K = 12288
#               and 15360, and K = 3072 at M = 4608, 28 MB, which fits in L2 whole): streaming loads (keep -1, the
#               library's rule) against default caching (keep 1), twice in turn; the cold column's token kernel is
#               the second read of x (HISTORY.md, twenty-sixth session)                          [diagnostics build]
#     attn      bench_attention.py --compile-check --out $OUT: fp8 / 8-bit attention candidates against bf16 SDPA at
#               the FLUX.1 shapes (issue 14, item 6), with the wheels carried in .whl-attn/ installed into /tmp/attn
#               first (benchmarks/fp8-attention.md: nvidia-cudnn-frontend from PyPI, no build); ATTN_ARGS adds options
#     full      bench_linear.py --out $OUT (the recorded table)
#     amax      quantize_act_given_amax (W4A8, amax given; install_compile_pass(amax_split=True)): its GPU tests,
#               tests/test_sharing.py (shared parts as one graph input under this torch), then bench_linear.py --quantize-only --precision w4a8 (quantize_act vs the given-amax op vs Inductor's
#               amax alone, per K). Then e.g. FLUX_ARGS="--configs bf16-compile,fp8-compile,w4a8-compile-split" flux
#     flux      bench_flux.py --profile --out $OUT $FLUX_ARGS: one FLUX.1-dev transformer step, bf16 / torchao fp8 /
#               SVDQuant w4a8 / int4, eager / compiled / CUDA graphs (default: all 9 configurations at 1024x1024,
#               batch 1; one process each; FLUX_ARGS e.g. "--configs bf16-compile,w4a8-compile --size 2048").
#               Extra rows (benchmarks/README.md): w4a8-compile[-ro]-lora16, w4a8-compile-lora16-fusedqkv (a rank-16
#               LoRA on the w4a8 model), nunchaku-{int4|w4a8}-compile[-ro] (the model written as a Nunchaku INT4
#               file in $TMPDIR, ~6.5 GB, loaded back exact / converted to w4a8, output SQNR), e.g.
#               FLUX_ARGS="--configs w4a8-compile,nunchaku-w4a8-compile --timeout 420 --budget 480 --tag nunchaku".
#               With SVDQUANT_OPS_GEMM_SCHEDULE set (e.g. overlap), the diagnostics build runs that schedule;
#               the rows w4a8-compile[-ro]-{overlap,overlap3,pingpong,pingpong-auto,promote-cvt,inflight} and
#               w4a8-compile[-ro]-fused-{inflight,multicast} run it for their own process only, beside shipped rows.
#     probe     benchmarks/probes/overlap_probe.cu: tensor-core vs FP32 promotion overlap (HISTORY.md, session 4)
#     regaprobe benchmarks/probes/w4a8_rega_probe.cu: W4A8 weights expanded in the consumers' registers (wgmma's
#               register A operand) against today's shared-memory int8 weights, exact check and times;
#               REGAPROBE_ARGS=--wide: on 128 x 256 tiles (ss256 against rega256) only
#     clusterprobe benchmarks/probes/quantize_cluster_probe.py: W4A8 quantize_act reading x once (a cluster along K
#               exchanging amax and down_act through distributed shared memory) vs the library's two passes: exact
#               check against the CPU op, time per FLUX shape and per step (HISTORY.md, 2026-12-05);
#               CLUSTERPROBE_ARGS=--library-only: the library's cluster kernel vs its two passes alone, no build
#     w4a16     bench_w4a16.py --check --out $OUT: weight-only 4-bit linear vs bf16 cuBLAS at M = 1..16, and its
#               CUDA op against the CPU op on the same shapes
#     w4a16grid bench_w4a16.py --grid-sweep: the GEMV kernel per forced blocks per SM             [diagnostics build]
#     w4a16group bench_w4a16.py --group-ab: a FLUX.1 step's 77 AdaLN linears one call each vs w4a16_linear_group
#               (bit-equal check, time per step), after tests/test_cuda_w4a16.py -k group
# The device machine gets a copy of the working tree without .git, so the results cannot ask git which commit they
# measured: the caller passes it, computed on its own machine, in SVDQUANT_COMMIT (git rev-parse HEAD) and
# SVDQUANT_DIRTY (1 when git status --porcelain prints anything, else 0); benchmarks/_record.py writes both into
# every result. Without them the results say "unknown".
# Steps marked [diagnostics build] run with SVDQUANT_OPS_DIAGNOSTICS=1: a second build of the op library (its own
# cache entry) with the schedule / epilogue / quantize_act switches; every other step uses the normal build. Each
# step is its own process, so each loads exactly one of the two builds.
# torchao, diffusers, accelerate and expecttest come from wheels carried in .whl/ (../shared/tools/gpu-wheels, plus
# accelerate and psutil downloaded the same way).
set -euo pipefail
export PYTHONUNBUFFERED=1
# Everything this script prints also goes to $OUT/gpu_run.log: the device tool returns only the output's last
# 12,000 characters, and a long step (the FLUX profile's JSON) can push earlier steps' results out of it.
if [[ -n "${OUT:-}" ]]; then exec > >(tee -a "$OUT/gpu_run.log") 2>&1; fi
export SVDQUANT_OPS_CACHE=${SVDQUANT_OPS_CACHE:-/tmp/svdq_cache}
# The op library's build cache travels between device calls: a carried .gpucache/svdq_cache.tgz (the previous call's
# $OUT/svdq_cache.tgz, copied there and named in the call's carry) is unpacked first, so a call whose sources match
# one of its builds (the cache is keyed by a hash of the sources, torch and the flags) skips the ~70 s build.
# benchmarks/prebuild.py makes that tarball on a machine without a GPU, after a CUDA source change.
if [[ -f .gpucache/svdq_cache.tgz && ! -d "$SVDQUANT_OPS_CACHE" ]]; then
  mkdir -p "$SVDQUANT_OPS_CACHE" && tar xzf .gpucache/svdq_cache.tgz -C "$SVDQUANT_OPS_CACHE" || true
fi
export SVDQUANT_RUN_COMMAND="bash benchmarks/gpu_run.sh $*"
export SVDQUANT_COMMIT=${SVDQUANT_COMMIT:-} SVDQUANT_DIRTY=${SVDQUANT_DIRTY:-}
unset SVDQUANT_OPS_DIAGNOSTICS  # only the steps below that need it set it
if ls .whl/*.whl >/dev/null 2>&1; then  # torchao, diffusers, accelerate, expecttest: ../shared/tools/gpu-wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $(ls .whl/*.whl | grep -v cutlass) \
    2>/dev/null || true
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the package from this tree (no pip install on the device)
if [[ -n "$SVDQUANT_COMMIT" ]]; then  # the caller's word wins: the device's copy may carry a stale .git
  echo "commit $SVDQUANT_COMMIT dirty ${SVDQUANT_DIRTY:-unknown} (passed by the caller)"
elif git rev-parse HEAD >/dev/null 2>&1; then
  echo "commit $(git rev-parse HEAD) (git)"
else
  echo "warning: no .git here and SVDQUANT_COMMIT not set: results will record commit 'unknown'" >&2
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader || true
t0=$(date +%s)
load_lib='import svdquant_ops.ops as o, torch; print("build ok", torch.__version__, o.load())'
if ! python3 -c "$load_lib" 2>&1 | tee /tmp/svdq_load.log; then
  # it compiled and failed: a real build error (stop); else a carried library did not load on this machine (e.g. one
  # benchmarks/prebuild.py built elsewhere): drop the carried entries and build here
  if grep -q "compiling the" /tmp/svdq_load.log; then exit 1; fi
  echo "the carried op library did not load: building it on this machine" >&2
  rm -rf "$SVDQUANT_OPS_CACHE"/svdquant_ops_C-*
  python3 -c "$load_lib"
fi
echo "build_s $(( $(date +%s) - t0 ))"
# (the normal build only: with the diagnostics build as well the file is too large to come back from the device)
if [[ -n "${OUT:-}" ]]; then
  # only the entry this call loaded (the newest): older entries unpacked from a carried tarball pushed it past 16 MiB
  newest=$(cd "$SVDQUANT_OPS_CACHE" && ls -td -- */ | grep -v diagnostics | head -1)
  tar czf "$OUT/svdq_cache.tgz" -C "$SVDQUANT_OPS_CACHE" "$newest" || true
fi
for step in "$@"; do
  case "$step" in
    tests) # TEST_K: a pytest -k expression over TEST_FILES (spaces allowed)
           # TESTS_S: seconds the tests may run; those that would start later are skipped (tests/conftest.py), so
           # the summary still says what ran (this command only: later steps' own tests run in full)
           # SVDQ_TEST_REPORT_AT_ONCE: each failure's traceback printed when it happens; faulthandler_timeout: the
           # stacks of a test still running after TEST_STALL_S seconds (default 240) dumped into the log
           SVDQ_TEST_REPORT_AT_ONCE=1 SVDQ_TEST_DEADLINE=${TESTS_S:+$(( $(date +%s) + TESTS_S ))} python3 -m pytest \
             -o faulthandler_timeout=${TEST_STALL_S:-240} ${TEST_FILES:-tests/test_cuda_ops.py tests/test_cuda_w4a16.py tests/test_cuda_model.py \
             tests/test_cuda_nunchaku.py tests/test_cuda_moves.py tests/test_cuda_fusion.py tests/test_cuda_pdl.py tests/test_cuda_unwrap.py tests/test_cuda_parallel.py tests/test_sharing.py \
             tests/test_lora.py tests/test_gemm_cat.py tests/test_op_errors.py} \
             ${TEST_K:+-k "$TEST_K"} -q -p no:cacheprovider -rfEs --durations=15 ;;
    gemm) SVDQUANT_OPS_DIAGNOSTICS=1 python3 benchmarks/bench_linear.py --gemm-only \
            --schedules "${SCHEDULES:-promote,skeleton}" ${GEMM_ARGS:-} ;;
    gmaxab) python3 benchmarks/bench_linear.py --gmax-ab ;;
    tokenab) python3 benchmarks/bench_linear.py --token-ab ;;
    clusterab) python3 benchmarks/bench_linear.py --cluster-ab
               python3 benchmarks/bench_linear.py --quantize-only --precision w4a8 --tokens 512 ;;
    pairab) python3 benchmarks/bench_linear.py --pair-ab ;;
    qastep)  # QA_BASELINE_TREE: a directory holding another version's svdquant_ops (git archive <commit> svdquant_ops,
             # carried under .gpucache): its runs alternate with this tree's, QA_ROUNDS times (default 2)
      for r in $(seq "${QA_ROUNDS:-2}"); do
        if [[ -n "${QA_BASELINE_TREE:-}" ]]; then
          echo "qastep round $r: baseline $QA_BASELINE_TREE"
          PYTHONPATH=$PWD/$QA_BASELINE_TREE:$PYTHONPATH python3 benchmarks/bench_linear.py --qa-step \
            --qa-save /tmp/qa_baseline.pt
        fi
        echo "qastep round $r: this tree"
        python3 benchmarks/bench_linear.py --qa-step ${QA_BASELINE_TREE:+--qa-compare /tmp/qa_baseline.pt}
      done ;;
    tileab) python3 benchmarks/bench_linear.py --tile-ab ;;
    weightsab) python3 benchmarks/bench_linear.py --weights-ab ;;
    expandbw) python3 benchmarks/bench_linear.py --expand-bw ;;
    qakeep) SVDQUANT_OPS_DIAGNOSTICS=1 python3 benchmarks/probes/qa_sweep.py --configs 0:0:-1,0:0:1,0:0:-1,0:0:1 \
              --shapes ${QAKEEP_SHAPES:-12288:32,15360:32,3072:64} ;;
    attn)
      if ls .whl-attn/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/attn .whl-attn/*.whl
      else
        echo "no .whl-attn/*.whl carried: only the candidates already installed run (benchmarks/fp8-attention.md)"
      fi
      PYTHONPATH=/tmp/attn${PYTHONPATH:+:$PYTHONPATH} python3 benchmarks/bench_attention.py --compile-check \
        --out "${OUT:-benchmarks/results}" ${ATTN_ARGS:-} ;;
    quantize)
      if [[ -n "${SVDQUANT_OPS_QA_CFG:-}${SVDQUANT_OPS_QA_SPLITS:-}" ]]; then
        SVDQUANT_OPS_DIAGNOSTICS=1 python3 benchmarks/bench_linear.py --quantize-only
      else
        python3 benchmarks/bench_linear.py --quantize-only
      fi ;;
    tiles) SVDQUANT_OPS_DIAGNOSTICS=1 python3 benchmarks/bench_linear.py --tile-overhead ;;
    overlap) SVDQUANT_OPS_DIAGNOSTICS=1 python3 benchmarks/bench_linear.py --overlap ${GEMM_ARGS:-} ;;
    full) python3 benchmarks/bench_linear.py --out "${OUT:-benchmarks/results}" ${FULL_ARGS:-} ;;
    amax) python3 -m pytest tests/test_cuda_ops.py tests/test_cuda_model.py -k "given_amax or amax_split" -q \
            -p no:cacheprovider -rfEs
          # shared parts as one graph input and the merge of identical calls, under this machine's torch
          python3 -m pytest tests/test_sharing.py -q -p no:cacheprovider -rfEs
          python3 benchmarks/bench_linear.py --quantize-only --precision w4a8 --rep-ms 30 ;;
    flux)  # a diagnostic GEMM schedule asked for runs on the diagnostics build; BENCH_DEADLINE (epoch seconds, set
      # by criterion_run.sh): the run's time budget ends there, whatever the build and the steps before took
      deadline=()
      [[ -n "${BENCH_DEADLINE:-}" ]] && deadline=(--budget $(( BENCH_DEADLINE - $(date +%s) )))
      SVDQUANT_OPS_DIAGNOSTICS=$([[ -n "${SVDQUANT_OPS_GEMM_SCHEDULE:-}" ]] && echo 1) \
        python3 benchmarks/bench_flux.py --profile --out "${OUT:-benchmarks/results}" ${FLUX_ARGS:-} "${deadline[@]}" ;;
    probe)
      inc=$(python3 -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
      nvcc -std=c++17 -O3 -arch=sm_90a $inc -I svdquant_ops/csrc --expt-relaxed-constexpr -diag-suppress 3306 \
        benchmarks/probes/overlap_probe.cu -o /tmp/overlap_probe -lcuda
      /tmp/overlap_probe ;;
    regaprobe)
      inc=$(python3 -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
      tl=$(python3 -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")
      nvcc -std=c++17 -O3 -arch=sm_90a $inc -I svdquant_ops/csrc --expt-relaxed-constexpr -diag-suppress 3306 \
        benchmarks/probes/w4a8_rega_probe.cu -L "$tl" -lc10 -ltorch_cpu -Xlinker -rpath="$tl" -lcuda -o /tmp/rega_probe
      timeout 180 /tmp/rega_probe ${REGAPROBE_ARGS:-} ;;
    clusterprobe) timeout 300 python3 benchmarks/probes/quantize_cluster_probe.py ${CLUSTERPROBE_ARGS:-} ;;
    w4a16) python3 benchmarks/bench_w4a16.py --check --out "${OUT:-benchmarks/results}" ${W4A16_ARGS:-} ;;
    w4a16grid) SVDQUANT_OPS_DIAGNOSTICS=1 python3 benchmarks/bench_w4a16.py --grid-sweep ${W4A16_ARGS:-} ;;
    w4a16group) python3 -m pytest -q -p no:cacheprovider -rfE tests/test_cuda_w4a16.py -k group
                python3 benchmarks/bench_w4a16.py --group-ab ;;
    ring)  # the diagnostics build first, in a process of its own (over 170 s on a fresh machine)
      SVDQUANT_OPS_DIAGNOSTICS=1 python3 -c "import svdquant_ops.ops as o; o.load()"
      SVDQUANT_OPS_DIAGNOSTICS=1 python3 benchmarks/bench_linear.py --tile-overhead --tile-w4a8-only ;;
    ncu)  # build first: under ncu the JIT build runs past any sensible timeout
      SVDQUANT_OPS_DIAGNOSTICS=1 python3 -c "import svdquant_ops.ops as o; o.load()"
      ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      stalls='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio'
      banks=l1tex__data_bank_reads.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_writes.avg.pct_of_peak_sustained_elapsed
      for v in ${NCU_SCHEDULES:-promote halffeed ring7} fp8; do
        if [[ $v == fp8 ]]; then k=nvjet; extra=--fp8; sched=promote; else k=gemm_kernel; extra=; sched=$v; fi
        SVDQUANT_OPS_DIAGNOSTICS=1 SVDQUANT_OPS_GEMM_SCHEDULE=$sched timeout 90 "$ncu" --clock-control none \
          -k "regex:$k" --launch-skip 1 --launch-count 1 --section SpeedOfLight --section WarpStateStats \
          --metrics "$stalls,$banks" python3 benchmarks/probes/gemm_ncu.py --shape "${NCU_SHAPE:-4096,9216,3072}" \
          $extra > "${OUT:-/tmp}/ncu_$v.txt" 2>&1 || echo "ncu $v: exit $?"
        echo "== ncu $v"
        grep -E "Duration|SM Frequency|L1/TEX Cache|L2 Cache Th|Compute \(SM\)|Warp Cycles Per Issued|data_bank" \
          "${OUT:-/tmp}/ncu_$v.txt" | cut -c1-140 || true
        grep -E "issue_stalled" "${OUT:-/tmp}/ncu_$v.txt" | awk '{ if ($NF + 0 > 0.05) print $1, $NF }' || true
      done ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
