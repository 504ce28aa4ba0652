"""``svdquant bench`` (``svdquant_ops/integrations/bench.py``, wrapped by ``benchmarks/bench_flux.py``) on the CPU:
kernel-name categories, a tiny-model run end to end (one process per configuration), the per-configuration
timeout, weight bytes of quantized weights, the table, and the one-line errors (exit code 2)."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from svdquant_ops.integrations import bench, cli

ROOT = Path(__file__).resolve().parents[1]

# Kernel names as torch.profiler reports them on an H200 (CUDA) and operator names of a CPU profile.
KERNELS = {
    # this package's kernels
    "void svdquant::cuda_impl::gemm::(anonymous namespace)::gemm_kernel<(svdquant::Precision)2, __nv_bfloat16, "
    "true>(CUtensorMap, CUtensorMap, CUtensorMap, CUtensorMap, CUtensorMap, CUtensorMap, "
    "svdquant::cuda_impl::gemm::(anonymous namespace)::Sm90Args)": "linear_svdquant",
    "void svdquant::cuda_impl::gemm::(anonymous namespace)::prep_kernel(svdquant::cuda_impl::gemm::"
    "(anonymous namespace)::PrepArgs)": "linear_svdquant",
    "void svdquant::cuda_impl::gemm::(anonymous namespace)::gemm_portable_kernel(svdquant::cuda_impl::gemm::"
    "(anonymous namespace)::PortableArgs)": "linear_svdquant",
    "void svdquant::cuda_impl::(anonymous namespace)::quantize_fast_kernel<__nv_bfloat16, 2, 2, 2, 0, 2>"
    "(__nv_bfloat16 const*, __nv_bfloat16 const*, __nv_bfloat16 const*, unsigned char*, void*, float*, long, long, "
    "long, bool)": "act_quant",
    "void svdquant::cuda_impl::(anonymous namespace)::quantize_tokens_kernel<__nv_bfloat16, true>(__nv_bfloat16 "
    "const*, __nv_bfloat16 const*, float const*, signed char*, __nv_bfloat16*, long, long, long)": "act_quant",
    "void svdquant::cuda_impl::(anonymous namespace)::down_act_split_reduce_kernel(float const*, float*, long, int)":
        "act_quant",
    "void svdquant::cuda_impl::(anonymous namespace)::quantize_w4a8_groupmax_pipe_kernel<c10::BFloat16, 32, 4>("
    "c10::BFloat16 const*, c10::BFloat16 const*, c10::BFloat16 const*, float*, float*, int, int, int, int)":
        "act_quant",
    "void svdquant::cuda_impl::w4a16_gemv_kernel<__nv_bfloat16>(...)": "linear_svdquant",
    "svdquant::cuda_impl::gemm::expand_w4a8_kernel(svdquant::cuda_impl::gemm::ExpandJob)": "linear_svdquant",
    "svdquant::expand_w4a8_weight": "linear_svdquant",  # the op (CPU profile)
    "svdquant::gemm_expanded": "linear_svdquant",
    # cuBLAS / CUTLASS GEMMs (bf16 and fp8 row-wise) and Inductor's GEMM templates
    "nvjet_tst_192x192_64x4_2x1_v_bz_coopA_TNT": "linear_dense",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel__"
    "5x_cublas": "linear_dense",
    "void cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm9x<cutlass::gemm::kernel::GemmUniversal<"
    "cute::tuple<int, int, int>, cutlass::gemm::collective::CollectiveMma<...f8f8bf16_rowwise...>>>>(...)":
        "linear_dense",
    "cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_bf16_bf16_128x256x64_1x2x1_0_tnn_align8_warpspecialized_"
    "cooperative_epi_tma": "linear_dense",
    "void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, float, 128, 16, 4, 4, false, false, "
    "cublasGemvParamsEx<int, cublasGemvTensorStridedBatched<__nv_bfloat16 const>, cublasGemvTensorStridedBatched<"
    "__nv_bfloat16 const>, cublasGemvTensorStridedBatched<__nv_bfloat16>, float> >(...)": "linear_dense",
    "void splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, false, false>(...)":
        "linear_dense",
    "triton_tem_fused_mm_0": "linear_dense",
    "_kernel_quantize_fp8_row": "act_quant",
    # attention: cuDNN SDPA, flash, memory-efficient (CUTLASS-based: attention wins over GEMM)
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0": "attention",
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
    "cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t> >, false, false, false, false, "
    "true, true, false, false>(pytorch_flash::Flash_fwd_params)": "attention",
    "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
    "cutlass::arch::Sm80, true, 64, 128, 128, true, true>::Params)": "attention",
    # Inductor's fused kernels (an SDPA input copy too) and ATen's elementwise kernels
    "triton_poi_fused__scaled_dot_product_cudnn_attention_clone_3": "other",
    "triton_red_fused__to_copy_add_mean_mul_native_layer_norm_pow_rsqrt_3": "other",
    "triton_per_fused_abs_amax_clamp_div_mul_reciprocal_7": "other",
    "void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, "
    "c10::BFloat16, at::native::binary_internal::MulFunctor<float> >, std::array<char*, 3ul> >(int, ...)": "other",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, false>(...)": "other",
    "Memcpy DtoD (Device -> Device)": "other",
    # CPU profile: operators
    "svdquant::gemm": "linear_svdquant",
    "svdquant::w4a16_linear": "linear_svdquant",
    "svdquant::quantize_act": "act_quant",
    "aten::addmm": "linear_dense",
    "aten::mm": "linear_dense",
    "aten::_scaled_mm": "linear_dense",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::native_layer_norm": "other",
    "aten::mul": "other",
    "## Call CompiledFxGraph fqtltvmorz3ei4eum4mgqjuoehvdyirqyrzbjmx37zeyqfbpoesp ##": "other",
}


@pytest.mark.parametrize("name", list(KERNELS))
def test_categorize(name):
    assert bench.categorize(name) == KERNELS[name]


def test_categories_cover_the_table():
    assert set(KERNELS.values()) == set(bench.CATEGORIES) == set(bench.CATEGORY_TITLES)


def _svdquant(*args, cwd):
    return subprocess.run([sys.executable, "-m", "svdquant_ops.integrations.cli", *args], cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)


def test_tiny_model_on_cpu(tmp_path):
    """The command as a user runs it: bf16 and SVDQuant int4, each in its own process, both rows in the table."""
    r = _svdquant("bench", "--model", "tiny", "--configs", "bf16-eager,int4-eager", "--iters", "2", "--warmup", "1",
                  "--size", "64", "--text-tokens", "8", "--device", "cpu", "--out", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = list(tmp_path.glob("*-cpu-flux-tiny-64px-b1.md"))
    assert len(md) == 1, list(tmp_path.iterdir())
    table = md[0].read_text()
    for line in ("- commit: ", "- command: ", "| bf16-eager | ", "| int4-eager | "):
        assert line in table, table
    data = json.loads(md[0].with_suffix(".json").read_text())
    rows = {row["config"]: row for row in data["rows"]}
    assert data["meta"]["commit"] and data["meta"]["versions"]["torch"] == torch.__version__
    assert set(rows) == {"bf16-eager", "int4-eager"} and all(row["ok"] for row in rows.values())
    for row in rows.values():
        assert len(row["ms_all"]) == 2 and math.isfinite(row["ms_median"]) and row["ms_median"] > 0
        assert row["output_finite"] and row["output_shape"] == [1, 16, 16] and row["tokens"] == dict(image=16,
                                                                                                      text=8)
    assert rows["bf16-eager"]["weight_bytes"] == rows["int4-eager"]["bf16_weight_bytes"]
    assert rows["int4-eager"]["weight_bytes"] < 0.7 * rows["bf16-eager"]["weight_bytes"]
    assert rows["int4-eager"]["quantized"] > 0 and rows["int4-eager"]["quantize_s"] > 0
    assert r.stdout.count(bench.RESULT_PREFIX) == 2  # one line per child


def test_profile_has_the_host_side():
    """--profile also ranks where the host's time to run a step goes (cProfile): on the CPU the quantized ops
    themselves lead it."""
    res = bench.run_one("int4-eager", model="tiny", size=64, iters=1, warmup=1, device="cpu", text_tokens=8,
                        profile=True, profile_steps=1)
    host = res["profile"]["host"]
    assert host["steps"] == 1 and 0 < host["ms_per_step"] and len(host["top_self"]) == 25
    assert any("svdquant" in t["function"] for t in host["top_self"][:5]), host["top_self"][:5]
    meta = dict(gpu="cpu", date="2026-12-05 00:00 UTC", versions=dict.fromkeys(
        ("torch", "cuda", "torchao", "diffusers", "triton", "python"), "x"), model_desc="m", size=64,
        image_tokens=16, text_tokens=8, batch=1, iters=1, warmup=1, device="cpu", timeout=300, rank=32,
        weight_only="w4a16")
    md = bench.report(meta, [dict(res, config="int4-eager")], lambda m: ["- header"])
    assert "| int4-eager | " in md.split("Host time of a step by function")[1]
    # the ops an eager step ran, in the report's calls table (no kernels on a CPU): each SVDQuant linear one
    # svdquant::linear, which runs quantize_act and gemm (counted as inside it)
    ops_, n = res["profile"]["ops_per_step"], res["quantized"]
    assert ops_["svdquant::linear"] == ops_["svdquant::gemm (in svdquant::linear)"] == n > 0, ops_
    assert ops_["svdquant::quantize_act (in svdquant::linear)"] == n and "svdquant::gemm" not in ops_, ops_
    assert f"linear {n:g}" in md.split("Calls per step")[1].split("Host time")[0]


def test_prologue_phases_of_a_compiled_step_are_in_order():
    """--profile times the host's prologue phase by phase: on a compiled step every phase is found, in call order,
    before the first kernel; an eager step has none of them, only its first kernel."""
    keys = ("to_guards_ms", "to_guards_end_ms", "to_pregraph_ms", "to_aot_wrapper_ms", "to_inductor_call_ms",
            "to_first_kernel_ms")
    # (a plain compiled row: the recipe rows install Inductor passes process-wide, as each row has its own process)
    res = bench.run_one("w4a8-compile", model="tiny", size=64, iters=1, warmup=2, device="cpu", text_tokens=8,
                        profile=True, profile_steps=2)
    pro = res["profile"]["prologue"]
    # (and every compiled row checks its output against an eager step of the same model: here within bf16 rounding)
    assert res["vs_eager_equal"] or res["vs_eager_sqnr_db"] > 30, res
    # the ops a compiled step runs: a GEMM per SVDQuant linear (this row does not concatenate them), and fewer
    # quantize_act calls than that (the linears that read one input share one)
    ops_ = res["profile"]["ops_per_step"]
    # (the double blocks' image / text pairs run theirs inside one parallel_linears call each, the default pass)
    calls = {op: ops_.get(f"svdquant::{op}", 0) + ops_.get(f"svdquant::{op} (in svdquant::parallel_linears)", 0)
             for op in ("gemm", "quantize_act")}
    assert ops_["svdquant::parallel_linears"] > 0, ops_
    assert calls["gemm"] == res["quantized"] > 0, (ops_, res["quantized"])
    assert 0 < calls["quantize_act"] < res["quantized"], ops_
    # and the AdaLN w4a16 linears, which all read SiLU(temb), as one grouped call (the default pass)
    assert res["weight_only"] > 1 and ops_["svdquant::w4a16_linear_group"] == 1, ops_
    assert "svdquant::w4a16_linear" not in ops_, ops_
    times = [pro[k] for k in keys]
    assert pro["steps"] == 2 and all(t is not None for t in times), pro
    assert times == sorted(times) and times[0] >= 0, pro
    eager = bench.run_one("int4-eager", model="tiny", size=64, iters=1, warmup=1, device="cpu", text_tokens=8,
                          profile=True, profile_steps=1)["profile"]["prologue"]
    assert all(eager[k] is None for k in keys[:-1]) and eager["to_first_kernel_ms"] is not None, eager


def test_prologue_phases_skip_the_gpu_side_step_annotation():
    """With CUDA activity the profiler repeats the step mark as a GPU annotation spanning the step's kernels: it
    must neither start a step of its own nor count as the first kernel (an H100 run read 6 steps for 3 and a first
    kernel at 0.00 ms)."""
    from types import SimpleNamespace as NS

    cpu, gpu = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def ev(name, start, end, dev=cpu):
        return NS(name=name, device_type=dev, time_range=NS(start=start, end=end))

    events = []
    for t0 in (0.0, 200_000.0):  # two steps, microseconds
        events += [ev(bench._STEP_MARK, t0, t0 + 150_000),
                   ev("TorchDynamo Cache Lookup", t0 + 100, t0 + 3_000),
                   ev("Pregraph bytecode", t0 + 3_100, t0 + 3_500),
                   ev("AOTDispatcher Runtime Wrapper Prologue", t0 + 3_600, t0 + 3_700),
                   ev("## Call CompiledFxGraph abc ##", t0 + 3_800, t0 + 140_000),
                   ev(bench._STEP_MARK, t0 + 5_000, t0 + 140_000, gpu),  # the GPU-side annotation
                   ev("void some_kernel<1>()", t0 + 5_000, t0 + 6_000, gpu),
                   ev("aten::empty", t0 + 3_900, t0 + 3_910)]
    pro = bench._prologue_phases(events, cuda=True)
    assert pro["steps"] == 2
    assert pro["to_guards_ms"] == 0.1 and pro["to_guards_end_ms"] == 3.0 and pro["to_inductor_call_ms"] == 3.8
    assert pro["to_first_kernel_ms"] == 5.0, pro
    # without the kernel, the annotation alone is no first kernel
    pro = bench._prologue_phases([e for e in events if not e.name.startswith("void")], cuda=True)
    assert pro["to_first_kernel_ms"] is None, pro


def _args(**kw):
    p = bench.add_arguments(argparse.ArgumentParser())
    return p.parse_args([f"--{k.replace('_', '-')}={v}" for k, v in kw.items()])


def test_timeout_costs_one_row(capsys):
    """A configuration that outlasts --timeout is ended (its whole process group) and recorded; the run goes on."""
    args = _args(model="tiny", configs="bf16-eager", device="cpu", timeout=0.5)
    assert bench.run(args) == 1
    out = capsys.readouterr().out
    assert "| bf16-eager | - | - |" in out and "**timed out after 0.5 s**" in out


@pytest.mark.parametrize("argv, message", [
    (["--configs", "bf16-eager,fp8-compile"], "fp8-compile needs a CUDA GPU"),
    (["--configs", "bf16-compile-ro,w4a8-compile-ro"], "bf16-compile-ro, w4a8-compile-ro need a CUDA GPU"),
    (["--configs", "w4a8-eager,w4a8-compile-overlap"], "w4a8-compile-overlap needs a CUDA GPU"),
    (["--configs", "bf16-eager,fp16-eager"], "unknown configuration fp16-eager"),
    (["--configs", "bf16-eager", "--size", "1000"], "--size must be a positive multiple of 16"),
    (["--configs", "nunchaku-int4-eager", "--rank", "24"], "--rank must be a positive multiple of 16"),
])
def test_errors_are_one_line(capsys, argv, message):
    assert cli.main(["bench", "--model", "tiny", "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("svdquant: error: ") and message in err[0], err


def test_flux_dev_needs_cuda(capsys):
    assert cli.main(["bench", "--device", "cpu", "--configs", "bf16-eager"]) == 2
    assert "--model flux-dev needs a CUDA GPU" in capsys.readouterr().err


def test_weight_bytes_of_quantized_weights():
    """Parts of quantized weights, not their logical 16-bit size: torchao's Float8Tensor through its inner tensors."""
    from torchao.quantization import PerRow
    from torchao.quantization.quantize_.workflows.float8.float8_tensor import Float8Tensor

    from svdquant_ops.storage.base import distinct_nbytes

    w = torch.randn(64, 128, dtype=torch.bfloat16)
    f8 = Float8Tensor.from_hp(w, granularity=PerRow())
    assert distinct_nbytes([w]) == 64 * 128 * 2
    assert distinct_nbytes([f8]) == 64 * 128 + 64 * 4  # e4m3 codes + one fp32 scale per row


def test_report_ratios_and_failures():
    meta = dict(gpu="GPU", date="2026-12-05 00:00 UTC", versions=dict.fromkeys(
        ("torch", "cuda", "torchao", "diffusers", "triton", "python"), "x"), model_desc="m", size=1024,
        image_tokens=4096, text_tokens=512, batch=1, iters=10, warmup=3, device="cuda", timeout=300, rank=32,
        weight_only="w4a16")
    ok = dict(ok=True, weight_bytes=2**31, peak_step_bytes=2**32, first_call_s=60.0, graphs=1, recompiles=0,
              quantize_s=None, output_finite=True)
    rows = [dict(ok, config="bf16-compile", ms_median=128.0),
            dict(ok, config="fp8-compile", ms_median=102.4, summary="502 linears fp8",
                 fp8_kernels="torch._scaled_mm", ms_head_start=95.1),
            dict(config="fp8-compile-coordesc", ok=False, error="timed out after 240 s")]
    md = bench.report(meta, rows, lambda m: ["- header"])
    assert "| bf16-compile | 128.0 | 1.00x | 2.00 GiB | 4.00 GiB | 60.0 | 1 / 0 |" in md
    assert "| fp8-compile | 102.4 | 1.25x |" in md and "502 linears fp8" in md
    assert "with a 60 ms head start 95.1 ms/step (host prologue 7.3 ms)" in md
    assert "| fp8-compile-coordesc | - | - |" in md and "**timed out after 240 s**" in md


def test_vs_eager_measures_the_compiled_output_against_an_eager_step():
    """The compiled-against-eager check: equal outputs say so, a wrong one gives its SQNR and largest difference, a
    model that fails is recorded as a one-line error, and the report lists each kind."""
    model = bench.build_model("tiny", "cpu")
    inputs = bench.make_inputs("tiny", 64, 1, 8, torch.device("cpu"), 1)
    with torch.inference_mode():
        out = model(**inputs)[0]
        same = bench.vs_eager(model, inputs, out)
        gen = torch.Generator().manual_seed(0)  # noise at 1 % of the output's RMS: SQNR ~40 dB
        noise = torch.randn(out.shape, generator=gen) * out.float().pow(2).mean().sqrt() * 0.01
        off = bench.vs_eager(model, inputs, out + noise.to(out.dtype))

        class Broken(torch.nn.Module):
            def forward(self, **kw):
                raise RuntimeError("no kernel image\nsecond line")

        broken = bench.vs_eager(Broken(), inputs, out)
    assert same["vs_eager_equal"] and same["vs_eager_sqnr_db"] is None and same["vs_eager_max_abs"] == 0.0
    assert not off["vs_eager_equal"] and 36 < off["vs_eager_sqnr_db"] < 44 and off["vs_eager_max_abs"] > 0
    assert broken == dict(vs_eager_error="RuntimeError: no kernel image")
    meta = dict(gpu="cpu", date="2026-12-07 00:00 UTC", versions=dict.fromkeys(
        ("torch", "cuda", "torchao", "diffusers", "triton", "python"), "x"), model_desc="m", size=64,
        image_tokens=16, text_tokens=8, batch=1, iters=1, warmup=1, device="cpu", timeout=300, rank=32,
        weight_only="w4a16")
    ok = dict(ok=True, weight_bytes=1, ms_median=1.0)
    md = bench.report(meta, [dict(ok, config="bf16-compile", **same), dict(ok, config="fp8-compile", **off),
                             dict(ok, config="w4a8-compile", **broken), dict(ok, config="int4-eager")],
                      lambda m: ["- header"])
    table = md.split("## Compiled step against the eager step")[1]
    assert "| bf16-compile | equal | 0 |" in table and "| w4a8-compile | - | - | **RuntimeError: no kernel image** |" \
        in table
    assert f"| fp8-compile | {off['vs_eager_sqnr_db']:.1f} |" in table and "int4-eager" not in table


def test_idle_attributes_each_gap_to_the_kernel_that_waited():
    from svdquant_ops.integrations.bench import _idle

    # (start, end, name) in µs; "x" runs inside "b"'s span (overlap: no gap before it), two gaps before "b"
    r = _idle([(35, 40, "b"), (0, 10, "a"), (12, 20, "b"), (20, 30, "c"), (38, 39, "x")], steps=1)
    assert r["kernels_per_step"] == 5
    assert abs(r["span_ms_per_step"] - 0.040) < 1e-12 and abs(r["idle_ms_per_step"] - 0.007) < 1e-12
    assert [(e["before"], e["gaps_per_step"]) for e in r["idle_top"]] == [("b", 2)]


# ------------------------------------------------------------------------------------------------ extra rows
EXTRA = ["w4a8-eager", "w4a8-eager-lora16", "nunchaku-int4-eager", "nunchaku-w4a8-eager"]


@pytest.fixture(scope="module")
def extra_rows(tmp_path_factory):
    """The LoRA and Nunchaku-file configurations on the tiny model, each through run_one (what a child process of
    the driver runs), with the temporary directory redirected to see that the Nunchaku file is deleted."""
    tmp = tmp_path_factory.mktemp("bench_tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("tempfile.tempdir", str(tmp))
        rows = {name: bench.run_one(name, model="tiny", size=64, iters=2, warmup=1, device="cpu", text_tokens=8)
                for name in EXTRA}
    return rows, tmp


def test_lora_row_counts_fused_and_side_branches(extra_rows):
    """A rank-16 LoRA on the 12 + 5 FLUX targets per double / single block of the 2 + 2 block model. With
    load_lora's defaults (fused up to rank 64): the linears that read an input alone (attention out, context out,
    both MLPs' fc1 / fc2; a single block's proj_out) fuse it into their rank-32 branch (48); q/k/v and the context
    q/k/v (one shared branch: 32 + 3·16 = 80) and a single block's q/k/v + proj_mlp (64 + 4·16) get side branches."""
    rows, _ = extra_rows
    r, plain = rows["w4a8-eager-lora16"], rows["w4a8-eager"]
    assert r["ok"] and r["output_finite"] and r["label"] == "SVDQuant w4a8 eager + rank-16 LoRA"
    lo = r["lora"]
    assert lo["targets"] == 2 * 12 + 2 * 5 and lo["fused"] + lo["side"] == lo["targets"]
    assert (lo["fused"], lo["side"]) == (2 * 6 + 2 * 1, 2 * 6 + 2 * 4)
    assert lo["rank"] == 16 and lo["params"] == sum(16 * (k + n) for k, n in _tiny_lora_shapes())
    assert lo["bytes_added"] == 2 * lo["params"]  # bf16; each A and B held once (fused or as side buffers)
    assert r["weight_bytes"] == plain["weight_bytes"] + lo["bytes_added"]


def _tiny_lora_shapes():
    d, mlp = 128, 512
    double = [(d, d)] * 8 + [(d, mlp), (mlp, d)] * 2
    single = [(d, d)] * 3 + [(d, mlp), (d + mlp, d)]
    return double * 2 + single * 2


def test_lora_with_one_a_per_input_fuses_the_double_blocks_qkv():
    """"-fusedqkv": one A per block input (as diffusers converts a Kohya / BFL fused qkv), appended once to the
    shared branch: the double blocks' q/k/v fuse (32 + 16); a single block's shared branch is already at 64."""
    from svdquant_ops.integrations.api import quantize_model

    model = bench.build_model("tiny", "cpu")
    quantize_model(model, precision="w4a8", rank=32)
    info = bench.add_lora(model, bench.CONFIGS["w4a8-compile-lora16-fusedqkv"], "cpu", 0, lambda: None)["lora"]
    assert (info["fused"], info["side"]) == (2 * 12 + 2 * 1, 2 * 4)


def test_nunchaku_rows_record_file_load_and_output_error(extra_rows):
    """The bf16 model written as a Nunchaku INT4 file and loaded back: exact int4 and converted to w4a8, the output
    SQNR against the bf16 model's step and (w4a8) against the exact int4 model's. Numbers seen on this tiny model:
    int4 vs bf16 36.8 dB, w4a8 vs bf16 38.8 dB, w4a8 vs int4 37.9 dB."""
    rows, tmp = extra_rows
    i4, w8 = rows["nunchaku-int4-eager"], rows["nunchaku-w4a8-eager"]
    for r in (i4, w8):
        assert r["ok"] and r["output_finite"] and r["output_shape"] == [1, 16, 16]
        assert r["nunchaku_file_bytes"] > 0 and r["nunchaku_write_s"] > 0 and r["nunchaku_load_s"] > 0
        assert r["nunchaku_rank"] == 32 and r["quantize_s"] is None
        assert r["weight_bytes"] < 0.7 * r["bf16_weight_bytes"]
        assert 10 < r["output_sqnr_vs_bf16_db"] < 80
    assert i4["label"] == "Nunchaku INT4 file, exact int4, eager"
    assert i4["summary"] == "36 SVDQuant, 6 w4a16 (Nunchaku file)"  # proj_out: two linears (SplitInputLinear)
    assert w8["summary"] == "34 SVDQuant, 6 w4a16 (Nunchaku file)"
    assert "output_sqnr_vs_int4_db" not in i4
    assert 10 < w8["output_sqnr_vs_int4_db"] < 80
    assert w8["output_sqnr_int4_vs_bf16_db"] == i4["output_sqnr_vs_bf16_db"]  # same file, same exact model
    assert i4["nunchaku_file_bytes"] == w8["nunchaku_file_bytes"]
    assert list(tmp.iterdir()) == []  # the temporary file is gone


def test_report_shows_the_lora_and_nunchaku_sections(extra_rows):
    rows, _ = extra_rows
    meta = dict(gpu="cpu", date="2026-12-05 00:00 UTC", versions=dict.fromkeys(
        ("torch", "cuda", "torchao", "diffusers", "triton", "python"), "x"), model_desc="m", size=64,
        image_tokens=16, text_tokens=8, batch=1, iters=2, warmup=1, device="cpu", timeout=300, rank=32,
        weight_only="w4a16")
    md = bench.report(meta, list(rows.values()), lambda m: [])
    lo = rows["w4a8-eager-lora16"]["lora"]
    assert "## LoRA rows" in md and f"| w4a8-eager-lora16 | rank 16 | {lo['fused']} / {lo['side']} |" in md
    assert "x (w4a8-eager) |" in md  # the ratio to the row without the LoRA
    assert "## Nunchaku INT4 file rows" in md
    w8 = rows["nunchaku-w4a8-eager"]
    assert (f"| {w8['output_sqnr_vs_bf16_db']:.1f} | {w8['output_sqnr_vs_int4_db']:.1f} | "
            f"{w8['output_sqnr_int4_vs_bf16_db']:.1f} |") in md
    assert "- (no w4a8-eager row)" not in md and "(no int4-eager row)" in md  # int4-eager was not run
    assert "output SQNR vs bf16" in md and "16 LoRA on 34 linears: 14 fused, 20 side branches" in md


def test_recipe_rows_compile_without_inductors_size_asserts():
    """Rows that apply the library's compile recipe compile with its compile_options (no assert_size_stride in the
    generated code); their "-asserts" A/B row and the baselines keep Inductor's default; the outputs are equal."""
    from torch._inductor.utils import run_and_get_code

    recipe, on = bench.CONFIGS["w4a8-compile-fused-unwrap-cat"], bench.CONFIGS["w4a8-compile-fused-unwrap-cat-asserts"]
    assert recipe.recipe and not recipe.asserts and "size asserts off (compile_options)" in recipe.label
    assert on.recipe and on.asserts and "size asserts on" in on.label and on.unwrap and on.cat_gemms
    assert not bench.CONFIGS["w4a8-compile-ro-fused-unwrap-cat"].asserts
    assert not bench.CONFIGS["int4-compile-fused-unwrap"].asserts
    for name in ("bf16-compile", "fp8-compile", "w4a8-compile-fused", "fp8-compile-unwrap", "w4a8-eager"):
        assert bench.CONFIGS[name].asserts and "size asserts" not in bench.CONFIGS[name].label, name
    from svdquant_ops import ops

    model = bench.build_model("tiny", "cpu")
    inputs = bench.make_inputs("tiny", 64, 1, 8, torch.device("cpu"), 1)
    outs, codes = [], []
    try:
        bench.quantize(model, recipe, 32, "w4a16")  # (turns the gemm_cat pass on process-wide, as in a row's process)
        bench.unwrap(model, recipe)
        for cfg in (on, recipe):
            torch._dynamo.reset()
            with torch.inference_mode():
                out, code = run_and_get_code(lambda: bench.compiled(model, cfg)(**inputs)[0])
            outs.append(out)
            codes.append("\n".join(code))
    finally:
        ops.install_compile_pass(cat_gemms=False)  # the library's default, for the tests after this one
        torch._dynamo.reset()
    assert "assert_size_stride(" in codes[0] and "assert_size_stride(" not in codes[1]
    assert torch.equal(outs[0], outs[1])


def test_parallel_rows_install_the_pass():
    """The "-parallel" / "-serial" rows turn parallelize_linears on / off in the row's process (bench.quantize)."""
    from torch._inductor import config

    from svdquant_ops import ops

    try:
        for suffix, on in (("-parallel", True), ("-serial", False)):
            cfg = bench.CONFIGS["w4a8-compile-fused-unwrap-cat" + suffix]
            assert ("side by side on two streams" in cfg.label) == on
            bench.quantize(bench.build_model("tiny", "cpu"), cfg, 32, "w4a16")
            assert config.post_grad_custom_pre_pass.parallel_linears is on
    finally:
        ops.install_compile_pass(cat_gemms=False, parallel_linears=ops.PARALLEL_LINEARS_DEFAULT)


def test_compile_options_merge_the_mode():
    import svdquant_ops

    assert svdquant_ops.compile_options() == {"size_asserts": False}
    assert svdquant_ops.compile_options("reduce-overhead") == {"triton.cudagraphs": True, "size_asserts": False}
    with pytest.raises(ValueError, match="compile_options: mode must be one of .*got 'fast'"):
        svdquant_ops.compile_options("fast")


@pytest.mark.parametrize("weights", ["bf16", "w4a8"])
def test_fused_rows_fuse_each_attention(weights):
    """"-fused" rows: q/k/v as one linear per attention (fuse_qkv), before quantizing a 16-bit baseline and after
    quantizing with SVDQuant; the step's output is the unfused model's (exactly, for SVDQuant on the CPU ops)."""
    cfg = bench.CONFIGS[f"{weights}-compile-fused"]
    assert cfg.fuse_qkv and cfg.label.endswith("q/k/v fused (fuse_qkv)")
    assert bench.CONFIGS[f"{weights}-compile-ro-fused"].mode == "reduce-overhead"
    model, plain = bench.build_model("tiny", "cpu"), bench.build_model("tiny", "cpu")
    info = bench.quantize(model, cfg, 32, "w4a16")
    bench.quantize(plain, bench.CONFIGS[f"{weights}-compile"], 32, "w4a16")
    assert info["fused_attention"] == 4 and info["summary"].endswith("q/k/v fused in 4 attention modules")
    assert not hasattr(model.transformer_blocks[0].attn, "to_q")
    inputs = bench.make_inputs("tiny", 64, 1, 8, torch.device("cpu"), 1)
    with torch.inference_mode():
        out, ref = model(**inputs)[0], plain(**inputs)[0]
    if weights == "w4a8":
        assert torch.equal(out, ref)
    else:  # another GEMM shape: the CPU's bf16 matmul may block K differently
        torch.testing.assert_close(out, ref, rtol=0, atol=2e-2)


def test_device_scripts_name_only_existing_rows():
    """Every row benchmarks/criterion_run.sh asks for is one of bench.CONFIGS: a misspelt row would cost a device
    call (bench_flux.py rejects unknown names only once it runs on the GPU machine). The variant rows also set the
    switch they are named for, and nothing else of it."""
    import re

    text = (ROOT / "benchmarks" / "criterion_run.sh").read_text()
    names = {n for m in re.finditer(r"configs=([\w,\-]+)", text) for n in m.group(1).split(",") if n}
    assert len(names) > 10, names
    assert not sorted(names - set(bench.CONFIGS))
    for suffix, field, value in (("-epishfl", "w4a8_epi", "shfl"), ("-epismem", "w4a8_epi", "smem"),
                                 ("-expandpair", "w4a8_expand", "pair"), ("-expandwarp", "w4a8_expand", "warp"),
                                 ("-qaregs", "token_lean", "0"), ("-qalean", "token_lean", "1"),
                                 ("-clustersmall", "w4a8_cluster", "small"), ("-cluster1", "w4a8_cluster", "1"),
                                 ("-parallel", "parallel_linears", True), ("-serial", "parallel_linears", False)):
        row = bench.CONFIGS["w4a8-compile-fused-unwrap-cat" + suffix]
        assert getattr(row, field) == value, (suffix, row)
    assert bench.CONFIGS["w4a8-compile-fused-unwrap-cat-qaregs"].gmax == "regs"
    assert bench.CONFIGS["w4a8-compile-fused-unwrap-cat-qalean"].gmax == "lean"


def test_switch_table_names_config_fields_and_variables_the_library_reads():
    """Each entry of bench.SWITCHES is a Config field and a variable the CUDA sources read (a renamed switch would
    otherwise make its A/B rows run the default silently), and a row setting any of them is CUDA-only."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(bench.Config)}
    sources = "".join(p.read_text() for p in (ROOT / "svdquant_ops" / "csrc").rglob("*.cu*"))
    for field, var in bench.SWITCHES.items():
        assert field in fields, field
        assert f'"{var}"' in sources, var
        row = dataclasses.replace(bench.CONFIGS["w4a8-compile-fused-unwrap-cat"], **{field: "1"})
        assert row.cuda_only, field
    assert not bench.CONFIGS["w4a8-compile-fused-unwrap-cat"].cuda_only


def test_child_env_sets_the_rows_switches_and_clears_the_rest():
    """A variant row's process gets its switches; a row that sets none runs the library's defaults even where the
    caller's environment has a switch set (a leftover export would otherwise change the baseline rows)."""
    caller = {"SVDQUANT_OPS_CUDA_W4A8_EPI": "shfl", "SVDQUANT_OPS_CUDA_W4A8_EXPAND": "pair",
              "SVDQUANT_OPS_CUDA_W4A8_GMAX": "pipe", "SVDQUANT_OPS_CUDA_W4A8_TOKEN_LEAN": "0",
              "SVDQUANT_OPS_CUDA_W4A8_CLUSTER": "1", "HOME": "/h"}
    plain = bench._child_env("w4a8-compile-fused-unwrap-cat", caller)
    assert not any(k in plain for k in caller if k.startswith("SVDQUANT_OPS_CUDA_"))
    assert plain["HOME"] == "/h" and str(ROOT) in plain["PYTHONPATH"].split(os.pathsep)
    for suffix, var, value in (("-epishfl", "SVDQUANT_OPS_CUDA_W4A8_EPI", "shfl"),
                               ("-expandpair", "SVDQUANT_OPS_CUDA_W4A8_EXPAND", "pair"),
                               ("-qaregs", "SVDQUANT_OPS_CUDA_W4A8_TOKEN_LEAN", "0"),
                               ("-qaregs", "SVDQUANT_OPS_CUDA_W4A8_GMAX", "regs"),
                               ("-clustersmall", "SVDQUANT_OPS_CUDA_W4A8_CLUSTER", "small")):
        env = bench._child_env("w4a8-compile-fused-unwrap-cat" + suffix, {})
        assert env.get(var) == value, (suffix, var)
