#!/usr/bin/env bash
# Issue 14's criterion rows in one device call, on an H200 only (the criterion names the H200; on another GPU this
# prints the GPU and exits 3 at once, so a call that got the wrong machine costs only its start).
#   HALF=plain (default): w4a8 as the library's compile recipe (fuse_qkv, unwrap_weights, cat_gemms), torchao fp8,
#                         bf16; compiled
#   HALF=both:            the whole criterion in one run: the w4a8 recipe and torchao fp8, compiled and under
#                         mode="reduce-overhead" (~470 s on an H200 with the build cache, estimated from the
#                         nineteenth session's rows, + ~70 s where the CUDA sources changed since the carried
#                         build; the bench's budget ends 30 s before the call's limit), then bf16 compiled (the
#                         ratios' baseline) where time is left: the budget skips it otherwise (HALF=rest has it)
#   HALF=ab:              the packing's A/B (the w4a8 recipe with every weight part a graph input of its own, then
#                         packed), the recipe with Inductor's size asserts on (their share of the host's prologue),
#                         then bf16 compiled (the ratios' baseline, on the same machine)
#   HALF=ro:              the same under mode="reduce-overhead" (fp8's first call takes ~110-160 s: --timeout 250),
#                         then bf16 compiled (Inductor's cache from bf16-ro makes it quick: HALF=pack's bf16 row)
#   HALF=rest:            what the criterion's record needs beside HALF=both, for the next call on the same warm
#                         machine (Inductor's and the op library's caches still there): bf16 compiled (the ratios'
#                         baseline), then int4 as its compile recipe, compiled and reduce-overhead
#   HALF=int4:            int4 as its compile recipe (fuse_qkv, unwrap_weights), compiled and reduce-overhead, the
#                         row the criterion records beside w4a8 (no bf16 row: ratios against another call's)
#   HALF=pdl:             the w4a8 recipe with our kernels launched plainly and programmatically dependent
#                         (SVDQUANT_OPS_CUDA_PDL=0 / 1), compiled and reduce-overhead: the A/B that decides kPdlDefault
#   HALF=weights:         the plain half with the w4a8 recipe twice: every W4A8 GEMM on weights expanded by the
#                         prep kernel, and on packed weights expanded in registers (SVDQUANT_OPS_CUDA_W4A8_WEIGHTS=prep /
#                         regs): the A/B that sets the library's per-call rule (kRegaMaxTokens), beside fp8 and bf16
#   HALF=prep:            the w4a8 recipe with the prep kernel keeping 1 or 4 (the default) weight units in flight
#                         per thread (SVDQUANT_OPS_CUDA_W4A8_PREP_UNITS=1 / 4; 1 also keeps the lane-pair expansion,
#                         4 runs the default warp-uniform one since 2026-12-07), then with the grid's three rows
#                         (SVDQUANT_OPS_CUDA_PREP_ROWS=all; only the rows with work is the default), compiled: the
#                         prep changes' A/Bs (profile.top's prep_kernel ms per step; -prep1 first: it timed out
#                         twice when last)
#   HALF=qa:              the w4a8 recipe with both W4A8 quantize_act passes without and with their lean variants
#                         (SVDQUANT_OPS_CUDA_W4A8_GMAX=regs / lean, SVDQUANT_OPS_CUDA_W4A8_TOKEN_LEAN=0 / 1: the same
#                         bytes; lean the default since 2026-12-07, from two H100 runs of opposite order), compiled
#                         (profile.top's quantize_fast_kernel and quantize_tokens_fast_kernel ms per step): the A/B
#                         to repeat on an H200
#   HALF=expand:          the w4a8 recipe with W4A8's weight expansion (prep) by lane pairs and warp-uniform (the
#                         default since 2026-12-07; SVDQUANT_OPS_CUDA_W4A8_EXPAND=pair / warp: the same bytes),
#                         compiled (profile.top's prep_kernel ms per step)
#   HALF=epi:             the w4a8 recipe with W4A8's 128 x 256 GEMM handing each thread the tile's channel scales and
#                         bias by warp shuffles and through shared memory (the default since 2026-12-07;
#                         SVDQUANT_OPS_CUDA_W4A8_EPI=shfl / smem: the same bytes), compiled (profile.top's
#                         gemm_kernel<256, 2, 0 / 1, ...> ms per step)
#   HALF=old:             the four kernel paths that were the default before 2026-12-07, each one variable away,
#                         after the w4a8 recipe as it ships: the recipe (lean quantize_act passes, shared-memory
#                         epilogue vectors, warp-uniform expansion) with GMAX=regs + TOKEN_LEAN=0 (-qaregs), with
#                         EPI=shfl (-epishfl) and with EXPAND=pair (-expandpair), compiled (profile.top per kernel):
#                         the H200's A/B of today's defaults, the old paths after the new (the H100 runs had the
#                         epilogue and expansion variants after theirs)
#   HALF=pack:            the w4a8 recipe, fp8, then the w4a8 recipe with every weight part a graph input of its own
#                         (unwrap_weights(pack=False)): the criterion's compiled pair and the packing's A/B of the
#                         host's time before the first kernel (its bf16 row is in HALF=ro: four cold compiles did not
#                         fit one call on an H100, 2026-12-07)
#   HALF=cluster:         the w4a8 recipe, then with W4A8's quantize_act by the one-pass cluster kernel for calls of
#                         at most 1024 tokens, all tokens of the batch counted (SVDQUANT_OPS_CUDA_W4A8_CLUSTER=small:
#                         at 1024x1024, batch 1, the text stream's 76 calls per step; at 512x512 also the image
#                         stream's; at batch >= 3 none, so the two rows are the same), compiled (profile.top's
#                         quantize kernels): the small-M rule's A/B at model level, after gpu_run.sh clusterab
#   HALF=parallel:        the w4a8 recipe, then with each double block's image and text linears of one shape as one
#                         parallel_linears call, the text one on a side stream (install_compile_pass(parallel_linears=
#                         True)), compiled and under reduce-overhead: issue 14 item 4's second lever at model level,
#                         after gpu_run.sh pairab
#   SIZE=512|1024|2048, BATCH=n: the step's size and batch (default 1024, 1; the issue also asks for 512, 2048 and
#                         batch 4)
#   CONFIGS=a,b:          the rows to run instead of the half's (e.g. the first rows of a half when the session's
#                         device time left is short)
#   PER=s:                each row's time limit instead of the half's (a cold host's first compile: 145 s for the
#                         w4a8 recipe on an H100, 2026-12-07; fp8's first call 122-178 s)
#   ANY_GPU=1:            run on whatever GPU came (a same-run comparison that is not the criterion)
# Row limits: a half with an fp8 row allows 250 s a row (fp8's first call took 122-178 s on cold H100 hosts, and its
# row ~35 s more; the twenty-sixth session's fp8 row timed out at 180 s); the bench's budget still skips what would
# not end in the call.
# Usage on the device: SVDQUANT_COMMIT=<hash> SVDQUANT_DIRTY=0 HALF=plain bash benchmarks/criterion_run.sh
# One half takes ~410 s on an H100 at 1024x1024 with the build cache carried (2026-12-06).
set -u
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); echo "$gpu"
if [[ "$gpu" != *H200* && -z "${ANY_GPU:-}" ]]; then echo "not an H200: nothing run"; exit 3; fi
limit=${LIMIT:-590}  # the device call: 600 s
case "${HALF:-plain}" in
  both) configs=w4a8-compile-fused-unwrap-cat,fp8-compile,w4a8-compile-ro-fused-unwrap-cat,fp8-compile-ro,bf16-compile
        per=250 ;;
  ab)   configs=w4a8-compile-fused-unwrap-cat-nopack,w4a8-compile-fused-unwrap-cat,w4a8-compile-fused-unwrap-cat-asserts,bf16-compile
        per=150 ;;
  ro)   configs=w4a8-compile-ro-fused-unwrap-cat,fp8-compile-ro,bf16-compile-ro,bf16-compile; per=250 ;;
  rest) configs=bf16-compile,int4-compile-fused-unwrap,int4-compile-ro-fused-unwrap; per=180 ;;
  int4) configs=int4-compile-fused-unwrap,int4-compile-ro-fused-unwrap; per=250 ;;
  weights) configs=w4a8-compile-fused-unwrap-cat-prep,w4a8-compile-fused-unwrap-cat-regs,fp8-compile,bf16-compile
        per=250 ;;
  prep) configs=w4a8-compile-fused-unwrap-cat-prep1,w4a8-compile-fused-unwrap-cat-prep4,w4a8-compile-fused-unwrap-cat-rowsall
        per=150 ;;
  pdl)  configs=w4a8-compile-fused-unwrap-cat-nopdl,w4a8-compile-fused-unwrap-cat-pdl,w4a8-compile-ro-fused-unwrap-cat-nopdl,w4a8-compile-ro-fused-unwrap-cat-pdl
        per=130 ;;
  qa) configs=w4a8-compile-fused-unwrap-cat-qaregs,w4a8-compile-fused-unwrap-cat-qalean; per=150 ;;
  expand) configs=w4a8-compile-fused-unwrap-cat-expandpair,w4a8-compile-fused-unwrap-cat-expandwarp; per=150 ;;
  epi) configs=w4a8-compile-fused-unwrap-cat-epishfl,w4a8-compile-fused-unwrap-cat-epismem; per=150 ;;
  old) configs=w4a8-compile-fused-unwrap-cat,w4a8-compile-fused-unwrap-cat-qaregs,w4a8-compile-fused-unwrap-cat-epishfl,w4a8-compile-fused-unwrap-cat-expandpair
        per=200 ;;  # 130 s timed out the rows on a fresh H100 (2026-12-07: the cold first call alone took 145 s)
  pack) configs=w4a8-compile-fused-unwrap-cat,fp8-compile,w4a8-compile-fused-unwrap-cat-nopack; per=250 ;;
  cluster) configs=w4a8-compile-fused-unwrap-cat,w4a8-compile-fused-unwrap-cat-clustersmall; per=200 ;;
  parallel) configs=w4a8-compile-fused-unwrap-cat,w4a8-compile-fused-unwrap-cat-parallel,w4a8-compile-ro-fused-unwrap-cat-parallel
        per=180 ;;
  *)    configs=w4a8-compile-fused-unwrap-cat,fp8-compile,bf16-compile; per=250 ;;
esac
configs=${CONFIGS:-$configs}  # CONFIGS=a,b: these rows instead of the half's (its tag and verdict kept)
per=${PER:-$per}  # PER=s: each row's limit instead of the half's (the bench's budget still ends the run in time)
size=${SIZE:-1024}; batch=${BATCH:-1}
tag=criterion-${HALF:-plain}
# the bench's budget ends 30 s before this call's limit, after the build (~70 s when the sources changed)
BENCH_DEADLINE=$(( $(date +%s) + limit - 30 )) \
FLUX_ARGS="--configs $configs --size $size --batch $batch --tag $tag --timeout $per" \
  timeout "$limit" bash benchmarks/gpu_run.sh flux
rc=$?
# The criterion's verdict for this half's pair (w4a8 recipe against fp8, the same mode, from idle), read from the
# run's JSON: faster, weights <= 0.30x of bf16's (11.9 B parameters in bf16), one graph, no recompiles.
python3 - "${OUT:-benchmarks/results}" "$tag" <<'PY' || true
import glob, json, os, sys
files = sorted(glob.glob(os.path.join(sys.argv[1], f"*-{sys.argv[2]}.json")), key=os.path.getmtime)
run = json.load(open(files[-1])) if files else {"meta": {}, "rows": []}
rows, gpu = {r["config"]: r for r in run["rows"]}, run["meta"].get("gpu", "?")
for mode in ("", "-ro"):
    w, f = rows.get(f"w4a8-compile{mode}-fused-unwrap-cat"), rows.get(f"fp8-compile{mode}")
    if not (w and f and w.get("ok") and f.get("ok")):
        continue
    bf16_bytes = w.get("bf16_weight_bytes") or 0
    share = w["weight_bytes"] / bf16_bytes if bf16_bytes else float("nan")
    ok = (w["ms_median"] < f["ms_median"] and share <= 0.30 and w["graphs"] == 1 and not w["recompiles"])
    print(f"{gpu}, criterion{mode or ' compiled'}: w4a8 {w['ms_median']:.1f} ms against fp8 {f['ms_median']:.1f} ms, "
          f"weights {share:.3f}x, graphs {w['graphs']} / recompiles {w['recompiles']}: "
          f"{('holds' if 'H200' in gpu else 'holds on this GPU (the criterion names the H200)') if ok else 'NOT MET'}")
PY
exit $rc
