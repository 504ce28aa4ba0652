"""Builders shared by the tests: random inputs of the ``torch.ops.svdquant`` ops (CPU reference, errors, opcheck,
GPU), tiny diffusers models with random weights (no downloads) and error metrics.

Each builder returns a dict keyed by the op's argument names (``quantize_act``: x, smooth, proj_down; ``gemm``:
act_codes, act_scales, codes, scales, global_scale, down_act, proj_up, bias; ``linear``: x, smooth, proj_down,
codes, scales, global_scale, proj_up, bias), so a test calls ``ops.gemm(**inputs, precision=..., out_dtype=...)``
or ``OPS.gemm(*op_args("gemm", inputs), precision, out_dtype, act_unsigned)``. All tensors are on the CPU.

What the distributions are chosen to exercise:

* activations: Gaussian; ``outliers`` scales 3 random channels by 40 (as in diffusion activations, so that group
  scales differ widely); ``unsigned`` makes GELU outputs (>= -0.17, the unsigned INT4 domain); ``wide`` spreads
  magnitudes over ~80 binades with exact zeros, -0.0 and tiny values (the quantizers' exact-division fallbacks);
  smooth λ in [0.25, 3.25] (``wide``: times 2^[-20, 20)).
* weights: every 4-bit code pattern (INT4 -8..7, all 16 e2m1 patterns including -0), except W4A8, whose codes are
  -7..7 (code * multiplier must fit int8) with integer multipliers drawn over all of [1, 18]; NVFP4 fp8 scales
  reach into the e4m3 subnormals (< 2^-6); the NVFP4 global scale is per tensor [1] or per output channel [N];
  W4A8's per-channel scale is [N]. Dequantized weights are O(0.01-0.1) and activations O(1), so outputs stay far
  from fp16 overflow.
* ``gemm_inputs`` draws activation codes directly (every byte / int8 value) instead of quantizing x: the GEMM is
  tested on codes the quantizer would rarely produce.

Seeds: ``generator(seed)`` for a fixed, reproducible draw (CPU reference tests); ``session_generator(key)`` mixes
the key with the session seed, fresh every pytest session unless ``SVDQ_TEST_SEED`` is set (GPU tests: new inputs
on every run; ``report_header()`` prints the seed so that a failure can be replayed).
"""

from __future__ import annotations

import math
import os
import random
import zlib

import torch

from svdquant_ops import layout

GROUP = {"int4": 64, "nvfp4": 16, "w4a8": 64}
W4A8_MULT_MAX = 18

# The op's tensor arguments in schema order (precision, out_dtype and act_unsigned follow them).
OP_ARGS = {
    "quantize_act": ("x", "smooth", "proj_down"),
    "gemm": ("act_codes", "act_scales", "codes", "scales", "global_scale", "down_act", "proj_up", "bias"),
    "linear": ("x", "smooth", "proj_down", "codes", "scales", "global_scale", "proj_up", "bias"),
}

# ------------------------------------------------------------------------------------------------------------------
# seeds
# ------------------------------------------------------------------------------------------------------------------
# Chosen once per process (on first import): SVDQ_TEST_SEED if set, else a fresh one.
SESSION_SEED = int(os.environ.get("SVDQ_TEST_SEED") or random.SystemRandom().randrange(1 << 30))


def report_header() -> str:
    """The line for pytest's report header (conftest: ``def pytest_report_header(config): return report_header()``)."""
    return f"SVDQ_TEST_SEED={SESSION_SEED} (seed of the GPU tests' random inputs; set it to replay a run)"


def _key_seed(key) -> int:
    return key if isinstance(key, int) else zlib.crc32(repr(key).encode())


def generator(seed) -> torch.Generator:
    """A CPU generator with a fixed seed: an int as is, any other key (a tuple of case parameters) through a stable
    hash of its repr (not Python's ``hash``, which changes between processes)."""
    return torch.Generator().manual_seed(_key_seed(seed) & 0x7FFFFFFF)


def session_generator(key) -> torch.Generator:
    """A generator for ``key`` in this session: fresh inputs every session, replayable with SVDQ_TEST_SEED."""
    return torch.Generator().manual_seed((_key_seed(key) ^ SESSION_SEED) & 0x7FFFFFFF)


# ------------------------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------------------------
def _lead(lead) -> tuple:
    return (lead,) if isinstance(lead, int) else tuple(lead)


def op_args(op: str, inputs: dict) -> list:
    """The tensor arguments of ``op`` (``OP_ARGS``) from a builder's dict, in schema order."""
    return [inputs[name] for name in OP_ARGS[op]]


def act_inputs(lead, K: int, R: int, dtype: torch.dtype, gen: torch.Generator, *, unsigned: bool = False,
               outliers: bool = False, wide: bool = False) -> dict:
    """quantize_act's inputs: x [*lead, K] (``lead`` an int M or a shape), smooth [K], proj_down [K, R] in dtype.

    outliers: 3 random channels x40. unsigned: GELU outputs (of 2x). wide: magnitudes over ~80 binades, zeros,
    -0.0, 1e-30, and smooth over 2^[-20, 20) (build in float32 and clamp before casting to fp16).
    """
    lead = _lead(lead)
    x = torch.randn(*lead, K, generator=gen)
    if outliers and K >= 8:  # a few large channels, as in diffusion activations
        x[..., torch.randperm(K, generator=gen)[:3]] *= 40
    if unsigned:  # GELU outputs: >= -0.17
        x = torch.nn.functional.gelu(x * 2)
    if wide:  # magnitudes over many binades, exact zeros, negative zeros, tiny values
        x = x * torch.exp2(torch.randint(-40, 40, x.shape, generator=gen).float())
        x[..., ::17] = 0.0
        x[..., 5::23] = -0.0
        x[..., 3::29] = 1e-30
    smooth = torch.rand(K, generator=gen) * 3 + 0.25
    if wide:
        smooth = smooth * torch.exp2(torch.randint(-20, 20, (K,), generator=gen).float())
    proj_down = torch.randn(K, R, generator=gen) / math.sqrt(K)
    return dict(x=x.to(dtype), smooth=smooth.to(dtype), proj_down=proj_down.to(dtype))


def weight_inputs(N: int, K: int, R: int, precision: str, model_dtype: torch.dtype, gen: torch.Generator, *,
                  global_scale: str | None = "default", bias: bool = True, up_dtype: torch.dtype | None = None) -> dict:
    """The weight operands of gemm / linear: codes (packed uint8 [N, K/2]), scales, global_scale, proj_up, bias.

    int4: codes -8..7, scales in model_dtype. nvfp4: all e2m1 patterns, fp8 scales (some subnormal).
    w4a8: codes -7..7, uint8 multipliers over [1, 18], fp32 per-channel scale [N].
    global_scale: "default" (None for int4, "tensor" for nvfp4, "channel" for w4a8), None, "tensor" ([1]) or
    "channel" ([N]) (w4a8 accepts only "channel"). proj_up [N, R] in up_dtype (default model_dtype); bias [N] or
    None.
    """
    G = K // GROUP[precision]
    if global_scale == "default":
        global_scale = {"int4": None, "nvfp4": "tensor", "w4a8": "channel"}[precision]
    if precision == "w4a8":
        vals = torch.randint(-7, 8, (N, K), generator=gen)
        scales = torch.randint(1, W4A8_MULT_MAX + 1, (N, G), generator=gen).to(torch.uint8)
        gsc_range = (1e-3, 1e-4)  # code * m * s <= 0.14
    elif precision == "int4":
        vals = torch.randint(-8, 8, (N, K), generator=gen)
        scales = (torch.rand(N, G, generator=gen) * 0.02 + 1e-4).to(model_dtype)
        gsc_range = (1.0, 0.5)  # only for error tests: int4 takes no global scale
    else:  # e4m3 subnormals below 2^-6 = 0.0156
        vals = torch.randint(0, 16, (N, K), generator=gen)
        scales = (torch.rand(N, G, generator=gen) * 0.5 + 0.01).to(torch.float8_e4m3fn)
        gsc_range = (0.02, 1e-3)  # 6 * 0.51 * 0.021 <= 0.07
    gsc = None
    if global_scale == "tensor":
        gsc = torch.rand(1, generator=gen) * gsc_range[0] + gsc_range[1]
    elif global_scale == "channel":
        gsc = torch.rand(N, generator=gen) * gsc_range[0] + gsc_range[1]
    elif global_scale is not None:
        raise ValueError(f"global_scale must be 'default', None, 'tensor' or 'channel', got {global_scale!r}")
    proj_up = (torch.randn(N, R, generator=gen) / math.sqrt(max(R, 1))).to(up_dtype or model_dtype)
    b = (torch.randn(N, generator=gen) * 0.5).to(model_dtype) if bias else None
    return dict(codes=layout.pack_nibbles(vals), scales=scales, global_scale=gsc, proj_up=proj_up, bias=b)


def gemm_inputs(lead, N: int, K: int, R: int, precision: str, model_dtype: torch.dtype, gen: torch.Generator,
                **weight_kw) -> dict:
    """gemm's tensor arguments with directly drawn activation codes: act_codes (int4 / nvfp4: every byte, packed,
    valid as signed or unsigned int4; w4a8: int8 -127..127), act_scales (int4 / w4a8 in model_dtype, nvfp4 fp8 with
    subnormals), down_act fp32 [*lead, R], then ``weight_inputs(**weight_kw)``. Dequantized activations are O(1)."""
    lead = _lead(lead)
    G = K // GROUP[precision]
    if precision == "w4a8":  # one int8 code per byte, one scale per token
        act_codes = torch.randint(-127, 128, (*lead, K), generator=gen).to(torch.int8)
        act_scales = (torch.rand(*lead, 1, generator=gen) * 0.02 + 1e-3).to(model_dtype)
    else:
        act_codes = torch.randint(0, 256, (*lead, K // 2), generator=gen).to(torch.uint8)
        if precision == "int4":
            act_scales = (torch.rand(*lead, G, generator=gen) * 0.1 + 1e-3).to(model_dtype)
        else:
            act_scales = (torch.rand(*lead, G, generator=gen) * 0.3 + 0.01).to(torch.float8_e4m3fn)
    down_act = torch.randn(*lead, R, generator=gen) * 4
    w = weight_inputs(N, K, R, precision, model_dtype, gen, **weight_kw)
    return dict(act_codes=act_codes, act_scales=act_scales, codes=w["codes"], scales=w["scales"],
                global_scale=w["global_scale"], down_act=down_act, proj_up=w["proj_up"], bias=w["bias"])


def packed_w4a8_weight(N: int, K: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A W4A8 weight to expand: codes of every byte (nibble 8, -8, which the quantizer never writes, included) and
    multipliers over [1, 18]."""
    return (torch.randint(0, 256, (N, K // 2), generator=gen, dtype=torch.uint8),
            torch.randint(1, W4A8_MULT_MAX + 1, (N, K // 64), generator=gen, dtype=torch.uint8))


def linear_inputs(lead, N: int, K: int, R: int, precision: str, model_dtype: torch.dtype, gen: torch.Generator, *,
                  unsigned: bool = False, outliers: bool = False, **weight_kw) -> dict:
    """linear's tensor arguments: ``act_inputs`` then ``weight_inputs(**weight_kw)``."""
    a = act_inputs(lead, K, R, model_dtype, gen, unsigned=unsigned, outliers=outliers)
    return {**a, **weight_inputs(N, K, R, precision, model_dtype, gen, **weight_kw)}


# ---------------------------------------------------------------- tiny models (random weights, no downloads)
def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.double(), out.double()
    return (10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item()


FLUX_TINY = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=64,
                 num_attention_heads=2, joint_attention_dim=128, pooled_projection_dim=64, guidance_embeds=False,
                 axes_dims_rope=[8, 28, 28])


def tiny_flux(seed: int = 0, dtype=torch.bfloat16):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**FLUX_TINY)
    return model.to(dtype).eval()


def flux_inputs(seed: int = 0, batch: int = 1, img_tokens: int = 32, txt_tokens: int = 8, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, img_tokens, FLUX_TINY["in_channels"], generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, txt_tokens, FLUX_TINY["joint_attention_dim"], generator=g).to(dtype),
        pooled_projections=torch.randn(batch, FLUX_TINY["pooled_projection_dim"], generator=g).to(dtype),
        timestep=torch.full((batch,), 0.5),
        img_ids=torch.stack([torch.zeros(img_tokens), torch.arange(img_tokens) // 8, torch.arange(img_tokens) % 8], 1),
        txt_ids=torch.zeros(txt_tokens, 3),
    )


def tiny_sd3(seed: int = 0, dtype=torch.bfloat16):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=32,
                                  num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64,
                                  pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16,
                                  dual_attention_layers=(0,))
    return model.to(dtype).eval()


def tiny_sana(seed: int = 0, dtype=torch.bfloat16):
    from diffusers import SanaTransformer2DModel

    torch.manual_seed(seed)
    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=32,
                                   num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=32,
                                   cross_attention_dim=64, caption_channels=64, sample_size=8)
    return model.to(dtype).eval()


class MLP(torch.nn.Module):
    """Mixed layer sizes: 96 input channels cannot be quantized (not a multiple of 64)."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(256, 512)
        self.act = torch.nn.GELU(approximate="tanh")
        self.fc2 = torch.nn.Linear(512, 96)
        self.fc3 = torch.nn.Linear(96, 128)

    def forward(self, x):
        return self.fc3(self.fc2(self.act(self.fc1(x))))


def tiny_pixart(seed: int = 0, dtype=torch.bfloat16):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                    num_layers=1, cross_attention_dim=64, caption_channels=64, sample_size=8,
                                    patch_size=2, norm_type="ada_norm_single",
                                    use_additional_conditions=False).to(dtype).eval()


def tiny_qwen_image(seed: int = 0, dtype=torch.bfloat16):
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
                                       attention_head_dim=32, num_attention_heads=2, joint_attention_dim=64,
                                       axes_dims_rope=(8, 12, 12)).to(dtype).eval()


def tiny_wan(seed: int = 0, dtype=torch.bfloat16):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                 out_channels=4, text_dim=64, freq_dim=64, ffn_dim=128, num_layers=1,
                                 rope_max_seq_len=32).to(dtype).eval()


def tiny_sdxl_unet(seed: int = 0, dtype=torch.bfloat16):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(64, 128),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                                transformer_layers_per_block=1).to(dtype).eval()


# Seeded inputs of the tiny models above, few tokens each (the timestep as each pipeline passes it).
def _randn(g: torch.Generator, dtype, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def sd3_inputs(seed: int = 0, batch: int = 1, txt_tokens: int = 8, dtype=torch.bfloat16):
    """8x8 latent, patch 2: 16 image tokens."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_randn(g, dtype, batch, 4, 8, 8),
                encoder_hidden_states=_randn(g, dtype, batch, txt_tokens, 64),
                pooled_projections=_randn(g, dtype, batch, 64), timestep=torch.full((batch,), 500.0))


def sana_inputs(seed: int = 0, batch: int = 1, txt_tokens: int = 8, dtype=torch.bfloat16):
    """4x8 latent, patch 1: 32 image tokens."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_randn(g, dtype, batch, 4, 4, 8),
                encoder_hidden_states=_randn(g, dtype, batch, txt_tokens, 64),
                timestep=torch.full((batch,), 500.0))


def pixart_inputs(seed: int = 0, batch: int = 1, txt_tokens: int = 8, dtype=torch.bfloat16):
    """8x8 latent, patch 2: 16 image tokens."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_randn(g, dtype, batch, 4, 8, 8),
                encoder_hidden_states=_randn(g, dtype, batch, txt_tokens, 64),
                timestep=torch.full((batch,), 500.0))


def qwen_image_inputs(seed: int = 0, batch: int = 1, txt_tokens: int = 8, dtype=torch.bfloat16):
    """Packed latents (2x2 patches of 4 channels) on a 4x8 grid: 32 image tokens."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_randn(g, dtype, batch, 32, 16),
                encoder_hidden_states=_randn(g, dtype, batch, txt_tokens, 64),
                timestep=torch.full((batch,), 0.5), img_shapes=[(1, 4, 8)] * batch)


def wan_inputs(seed: int = 0, batch: int = 1, txt_tokens: int = 8, dtype=torch.bfloat16):
    """2 frames of 8x8, patch (1, 2, 2): 32 video tokens."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_randn(g, dtype, batch, 4, 2, 8, 8),
                encoder_hidden_states=_randn(g, dtype, batch, txt_tokens, 64),
                timestep=torch.full((batch,), 500.0))


def sdxl_unet_inputs(seed: int = 0, batch: int = 1, txt_tokens: int = 8, dtype=torch.bfloat16):
    """16x16 latent; added conditions: pooled text embedding (80 - 6 * 8 = 32 channels) and the 6 size / crop ids."""
    g = torch.Generator().manual_seed(seed)
    return dict(sample=_randn(g, dtype, batch, 4, 16, 16), timestep=torch.full((batch,), 500.0),
                encoder_hidden_states=_randn(g, dtype, batch, txt_tokens, 64),
                added_cond_kwargs=dict(text_embeds=_randn(g, dtype, batch, 32),
                                       time_ids=torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * batch).to(dtype)))


def capture_cuda_graph(fn):
    """``(graph, output)``: ``fn()`` warmed up on a side stream, as torch.cuda.graph requires, then captured; a
    replay rewrites ``output`` from whatever the tensors ``fn`` reads hold then."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def assert_cuda_graph_replays_eager(fn, x: torch.Tensor) -> None:
    """Capture ``fn(static_x)`` in a CUDA graph: its replay equals the eager call bit for bit (outputs compared as
    16-bit patterns), also after new values are copied into the static input."""
    eager = fn(x)
    static_x = x.clone()
    graph, static_y = capture_cuda_graph(lambda: fn(static_x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y.view(torch.int16), eager.view(torch.int16))
    # new inputs through the same graph
    x2 = torch.randn_like(x)
    static_x.copy_(x2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y.view(torch.int16), fn(x2).view(torch.int16))


def count_calls(fn, ops=("quantize_act", "gemm")):
    """(fn(), then its calls of each svdquant op in ``ops``), counted by the profiler (eager or compiled: what
    actually ran)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    names = [e.name for e in prof.events()]
    return (out, *(names.count(f"svdquant::{op}") for op in ops))


def fresh_compile_state():
    """Generator for an autouse fixture: Dynamo's caches and the ops' eager quantize_act cache reset around a test."""
    from svdquant_ops import ops

    torch._dynamo.reset()
    ops.clear_act_cache()
    yield
    torch._dynamo.reset()
    ops.clear_act_cache()


class FakeGraph:
    """An FX graph built by hand, each node with its fake value (what the pass reads)."""

    def __init__(self):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.mode = FakeTensorMode()
        self.graph = torch.fx.Graph()

    def inputs(self, prefix, tensors):
        nodes = []
        for i, t in enumerate(tensors):
            node = self.graph.placeholder(f"{prefix}{i}")
            node.meta["val"] = self.mode.from_tensor(t)
            nodes.append(node)
        return nodes

    def call(self, fn, *args):
        node = self.graph.call_function(fn, args)
        with self.mode:
            node.meta["val"] = fn(*[x.meta["val"] if isinstance(x, torch.fx.Node) else x for x in args])
        return node
