"""LoRA adapters on models quantized by svdquant_ops, without requantizing: load, stack, weight, switch, unload.

The public names are re-exported by ``svdquant_ops.lora``.

How an adapter is applied. A LoRA adds ``s·a/r · x·Aᵀ·Bᵀ`` to a linear (``A`` [r, K], ``B`` [N, r], ``a`` its alpha,
``s`` the strength). An SVDQuant layer already has the low-rank branch ``(x·proj_down)·proj_upᵀ`` on the *raw*
input (``quantize_act`` computes ``down_act = x @ proj_down`` before smoothing; ``svdquant_ops.ops``), so the sum is
one wider branch::

    proj_down' = [proj_down | Aᵀ | 0],   proj_up' = [proj_up | s·a/r·B | 0]    (the adapter's slice padded to 16)

Both kernels run as before with a larger R; the 4-bit part is untouched (no requantization), and the extra columns
are exact: ``down_act`` is the same fp32 product of the raw input with the new columns, and the GEMM adds them to
the same fp32 sum. Several adapters are several slices. The unscaled ``a/r·B`` of each adapter is kept beside the
model, and a strength change writes ``s·a/r·B`` into the adapter's slice of ``proj_up`` in place (``copy_``): the
same tensor, the same shapes, so a compiled model does not recompile (the weights are graph inputs) and a CUDA
graph sees the new values at its next replay. Strength 0 writes zeros: the output equals the model without the
adapter (exactly, on the CPU ops). Loading or unloading changes R, so a compiled model recompiles once.

Linears that read the same input (``share_inputs``) hold one ``proj_down`` tensor; an adapter on some of them
appends its columns to that shared tensor (one ``quantize_act`` still serves the group) and zero columns to the
others' ``proj_up``, which leaves their outputs unchanged bit for bit. Equal ``A`` of several members (the fused
qkv of Kohya / BFL files, which diffusers' converter copies to to_q, to_k and to_v) are appended once.

Where the branch would grow past ``max_fused_rank`` (default 64, ``FUSED_RANK_LIMIT``: the CUDA ``quantize_act``
fast kernel runs at two blocks per SM up to R = 64, at one up to 128, and past 128 the slower portable kernel
runs), and on 16-bit linears and 4-bit weight-only
(``W4A16Tensor``) linears, the adapter runs as an exact side branch instead: a forward hook adding
``(x·Dᵀ)·Uᵀ`` with ``D`` [R, K] the adapters' ``A`` stacked and ``U`` [N, R] their scaled ``B`` side by side, held
as non-persistent buffers of the linear (they move with the model; they are not in ``state_dict()``, and
``save_pretrained`` refuses a model that has them: it would keep the fused adapters and lose these). Strength changes
write into
``U`` in place, as above. The module classes stay diffusers' own, so ``torch.compile`` traces the hook into the
same graph.

Unloading rebuilds the branch from the columns that remain: the original ``proj_down`` / ``proj_up`` come back with
the same values bit for bit (and one shared ``proj_down`` per input group, as ``share_inputs`` left it).

Files: diffusers / PEFT (``<module>.lora_A.weight``, ``.lora_B.weight``, optional ``.alpha`` keys or PEFT metadata
``lora_alpha`` / ``rank_pattern`` / ``alpha_pattern`` / ``use_rslora``), and every format diffusers' own
``lora_state_dict`` of the model's pipeline converts (FLUX: Kohya ``lora_unet_*``, XLabs, ...); the conversion is
diffusers' code, not a copy.
"""

from __future__ import annotations

import inspect
import logging
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..storage import SVDQuantTensor
from ..storage.tensor import RANK_MULTIPLE
from ..storage.shared_moves import mark_shared
from .unwrap import refuse_unwrapped

log = logging.getLogger("svdquant_ops")

# The default max_fused_rank. quantize_act's CUDA fast kernel runs up to R = 128, at one block per SM past 64
# (csrc/cuda/README.md); whether fusing to 128 beats side branches in a whole model is not yet measured
# (benchmarks/README.md, w4a8-compile-lora16-fuse128), so the default stays at the two-blocks-per-SM limit.
FUSED_RANK_LIMIT = 64
STATE_ATTR = "_svdquant_lora"  # the adapters of a model: a plain attribute of its root module (not saved)
SIDE_DOWN, SIDE_UP = "_svdquant_lora_down", "_svdquant_lora_up"  # side-branch buffers (non-persistent)

# The pipeline mixin whose ``lora_state_dict`` knows each denoiser's non-diffusers formats.
_MIXINS = {
    "FluxTransformer2DModel": "FluxLoraLoaderMixin",
    "SD3Transformer2DModel": "SD3LoraLoaderMixin",
    "SanaTransformer2DModel": "SanaLoraLoaderMixin",
    "QwenImageTransformer2DModel": "QwenImageLoraLoaderMixin",
    "Flux2Transformer2DModel": "Flux2LoraLoaderMixin",
    "UNet2DConditionModel": "StableDiffusionXLLoraLoaderMixin",
}
_DENOISER_PREFIXES = ("transformer.", "unet.")
_OTHER_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3", "te.", "te1.", "te2.")
_KEY = re.compile(r"^(?P<module>.+?)\.(?:lora_(?P<ab>A|B)|lora\.(?P<du>down|up))(?:\.[^.]+)?\.weight$")


# ------------------------------------------------------------------------------------------------------------------
# State
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class _Block:
    """One member's part of an adapter's fused slice: ``strength·factor·up`` goes to columns offset..offset+r
    (``up`` = B [N, r] as the file gave it, on the layer's device; ``factor`` = alpha / r)."""

    offset: int
    up: torch.Tensor
    factor: float


@dataclass
class _Segment:
    """One adapter's columns in a fused group: ``width`` (a multiple of 16), and per member index its block (a
    member the adapter does not target has none: zero columns)."""

    adapter: str
    width: int
    blocks: dict[int, _Block]


@dataclass
class _FusedGroup:
    """SVDQuant linears holding one ``proj_down`` (a group of ``share_inputs``, or a single linear): its first
    ``base_rank`` columns are the model's own branch, then one segment per adapter, in load order."""

    members: list[nn.Linear]
    base_rank: int
    segments: list[_Segment] = field(default_factory=list)

    def offset(self, seg: _Segment) -> int:
        off = self.base_rank
        for s in self.segments:
            if s is seg:
                return off
            off += s.width
        raise AssertionError("segment not in group")


@dataclass
class _SideSegment:
    adapter: str
    offset: int
    up: torch.Tensor  # B [N, r] as the file gave it
    factor: float  # alpha / r


class _SideBranch:
    """Forward hook of one linear: ``output + (x·Dᵀ)·Uᵀ`` with the module's buffers D [R, K] and U [N, R]."""

    def __init__(self):
        self.segments: list[_SideSegment] = []
        self.handle = None

    def __call__(self, module: nn.Module, args, output):
        down, up = getattr(module, SIDE_DOWN), getattr(module, SIDE_UP)
        return output + F.linear(F.linear(args[0], down), up)


@dataclass
class _State:
    scales: dict[str, float] = field(default_factory=dict)  # adapter -> strength, in load order
    groups: list[_FusedGroup] = field(default_factory=list)
    sides: dict[nn.Module, _SideBranch] = field(default_factory=dict)


def _state(model: nn.Module) -> _State | None:
    return model.__dict__.get(STATE_ATTR)


# ------------------------------------------------------------------------------------------------------------------
# Reading LoRA files
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class LoraLayer:
    """One linear's LoRA as read from a file: ``down`` = A [r, K], ``up`` = B [N, r], ``scale`` = alpha / r (or
    alpha / sqrt(r) with rsLoRA)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float


def _split_model(target) -> tuple[nn.Module, type | None]:
    """(the denoiser, the pipeline class whose ``lora_state_dict`` reads files for it, or None)."""
    if isinstance(target, nn.Module):
        name = _MIXINS.get(type(target).__name__)
        if name is None:
            return target, None
        try:
            import diffusers.loaders.lora_pipeline as lp
        except ImportError:
            return target, None
        return target, getattr(lp, name, None)
    from .pipelines import denoiser_of

    _, denoiser = denoiser_of(target)
    owner = type(target) if hasattr(type(target), "lora_state_dict") else None
    return denoiser, owner


def _looks_local(source) -> bool:
    """A path, not a hub id ('owner/name'): a Path, an absolute, ./ or ~ path, a name with a weights suffix, or
    more than one '/'."""
    text = str(source)
    return (isinstance(source, Path) or text.startswith((".", "/", "~")) or text.endswith((".safetensors", ".bin"))
            or text.count("/") > 1)


def _read_raw(source, owner: type | None, kwargs: dict):
    """(state dict, network alphas or None, PEFT metadata or None) through diffusers' converters when known."""
    if isinstance(source, dict):
        source = dict(source)  # diffusers' converters pop keys
    elif isinstance(source, (str, Path)) and _looks_local(source):
        source = str(Path(source).expanduser())
        if not Path(source).exists():  # diffusers would take it for a hub id: a download, or "Repo id must be ..."
            raise FileNotFoundError(f"load_lora: no LoRA file at {source!r}")
    if owner is not None:
        params = inspect.signature(owner.lora_state_dict).parameters
        kw = dict(kwargs, return_lora_metadata=True)
        if "return_alphas" in params:
            sd, alphas, metadata = owner.lora_state_dict(source, return_alphas=True, **kw)
        else:
            sd, metadata = owner.lora_state_dict(source, **kw)
            alphas = None
        return dict(sd), alphas, metadata
    if isinstance(source, dict):
        return source, None, None
    path = Path(source)
    if path.is_dir():
        path = path / kwargs.get("weight_name", "pytorch_lora_weights.safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"load_lora: no LoRA file at {str(path)!r}")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    import json

    metadata = json.loads(meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in meta else None
    return load_file(str(path)), None, metadata


def _strip(key: str) -> str | None:
    """The key relative to the denoiser, or None for another component's key (text encoders)."""
    key = key.removeprefix("base_model.model.")
    for p in _DENOISER_PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    if key.startswith(_OTHER_COMPONENTS):
        return None
    return key


def _pattern_match(name: str, patterns: dict) -> tuple[str, object] | None:
    """PEFT's rank_pattern / alpha_pattern: (pattern, value) of the first pattern the module name ends with."""
    for pat, v in (patterns or {}).items():
        if name == pat or name.endswith("." + pat) or re.fullmatch(rf"(.*\.)?{pat}", name):
            return pat, v
    return None


def _pattern_value(name: str, patterns: dict, default):
    """PEFT's rank_pattern / alpha_pattern: the value of the first pattern the module name ends with."""
    hit = _pattern_match(name, patterns)
    return default if hit is None else hit[1]


def _alpha(value, where: str) -> float:
    """A LoRA alpha (a file's ``.alpha`` tensor, diffusers' network alpha, PEFT's ``lora_alpha`` / ``alpha_pattern``)
    as a float: one finite number. 0 is an adapter that adds nothing and a negative alpha flips its sign, both legal;
    NaN or Inf would make every output of the model NaN, so they are refused here, naming ``where``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"load_lora: {where} must be a single number, got a tensor of shape {list(value.shape)} "
                             "(corrupt LoRA file?)")
        value = value.item()
    return _finite_number(value, f"load_lora: {where} must be a finite number", " (corrupt LoRA file?)", ValueError)


def _finite_number(value, what: str, hint: str = "", not_a_number=TypeError) -> float:
    """``value`` as a finite float; ``not_a_number`` (or ValueError for NaN / Inf) says ``what``, the value and
    ``hint`` otherwise."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise not_a_number(f"{what}, got {value!r}{hint}") from None
    if not math.isfinite(number):
        raise ValueError(f"{what}, got {number}{hint}")
    return number


def read_lora(model_or_pipe, path_or_state_dict, **load_kwargs) -> dict[str, LoraLayer]:
    """The LoRA of ``path_or_state_dict`` as {module name in the denoiser: ``LoraLayer``}, in diffusers names.

    A file path, a directory (``weight_name``), a hub id (diffusers' loader), or a state dict. Non-diffusers formats
    are converted by diffusers' own ``lora_state_dict`` of the model's pipeline (FLUX: Kohya, XLabs, ...)."""
    denoiser, owner = _split_model(model_or_pipe)
    sd, alphas, metadata = _read_raw(path_or_state_dict, owner, load_kwargs)
    if metadata:
        for p in _DENOISER_PREFIXES:  # pipeline files prefix the config of each component
            sub = {k[len(p):]: v for k, v in metadata.items() if k.startswith(p)}
            if sub:
                metadata = sub
                break
    alphas = dict(alphas or {})
    downs, ups, skipped, unmatched = {}, {}, [], []
    for key, value in sd.items():
        rel = _strip(key)
        if rel is None:
            skipped.append(key)
            continue
        if "lora_magnitude_vector" in rel or rel.endswith(".dora_scale"):
            raise ValueError(f"load_lora: DoRA adapters are not supported (key {key!r})")
        if ".lora_B." in rel and rel.endswith(".bias"):
            raise ValueError(f"load_lora: LoRA biases (lora_bias) are not supported (key {key!r})")
        if rel.endswith(".alpha"):
            alphas[key] = value
            continue
        m = _KEY.match(rel)
        if m is None:
            unmatched.append(key)
            continue
        which = m["ab"] or ("A" if m["du"] == "down" else "B")
        (downs if which == "A" else ups)[m["module"]] = value
    alpha_of = {}
    for key, v in alphas.items():
        rel = _strip(key)
        if rel is not None:
            alpha_of[rel.removesuffix(".alpha")] = _alpha(v, f"alpha {key!r}")
    if unmatched or not (downs or ups):
        found = [k for k in sd if _strip(k) is not None][:5]
        raise ValueError(
            "load_lora: unknown LoRA key format: " + (f"{len(unmatched)} keys are neither lora_A/lora_B (or "
                                                      f"lora.down/lora.up) weights nor alphas, e.g. {unmatched[:5]}"
                                                      if unmatched else f"no LoRA weights for the denoiser among "
                                                      f"{found or list(sd)[:5]}")
            + f". Formats read: diffusers / PEFT names, and what diffusers' "
            f"{owner.__name__ if owner else 'pipeline'}.lora_state_dict converts for "
            f"{type(denoiser).__name__}; pass the pipeline (load_lora(pipe, ...)) to use its converters.")
    if skipped:
        log.warning("svdquant_ops: load_lora applies adapters to the denoiser only; %d keys of other components "
                    "(text encoders) were ignored, e.g. %s", len(skipped), skipped[:3])
    half = sorted(set(downs) ^ set(ups))
    if half:
        raise ValueError(f"load_lora: {len(half)} modules have only one of lora_A / lora_B, e.g. {half[:5]}")
    metadata = metadata or {}
    layers = {}
    for name in downs:
        a, b = downs[name], ups[name]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
            raise ValueError(f"load_lora: {name}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not the "
                             "factors of one linear's LoRA ([r, in_features] and [out_features, r], r >= 1)")
        for what, t in (("lora_A", a), ("lora_B", b)):
            if not torch.isfinite(t.float()).all():
                raise ValueError(f"load_lora: {name}: {what} contains NaN or Inf (corrupt LoRA file?)")
        r = a.shape[0]
        if name in alpha_of:
            alpha = alpha_of[name]
        elif metadata:
            hit = _pattern_match(name, metadata.get("alpha_pattern"))
            if hit is not None:
                alpha = _alpha(hit[1], f"{name}: the metadata's alpha_pattern[{hit[0]!r}]")
            else:
                alpha = _alpha(metadata.get("lora_alpha", r), f"{name}: the metadata's lora_alpha")
            r_cfg = int(_pattern_value(name, metadata.get("rank_pattern"), metadata.get("r", r)))
            if r_cfg != r:
                log.warning("svdquant_ops: %s: the file's metadata says rank %d, its weights have rank %d; using %d",
                            name, r_cfg, r, r)
        else:
            alpha = float(r)  # diffusers / PEFT without alphas: scale 1
        scale = alpha / math.sqrt(r) if metadata.get("use_rslora") else alpha / r
        layers[name] = LoraLayer(a, b, scale)
    return layers


# ------------------------------------------------------------------------------------------------------------------
# Applying
# ------------------------------------------------------------------------------------------------------------------
def _resolve(denoiser: nn.Module, layers: dict[str, LoraLayer]) -> dict[nn.Linear, tuple[str, LoraLayer]]:
    modules = dict(denoiser.named_modules())
    missing = [n for n in layers if n not in modules]
    if missing:
        from .fusion import is_fused

        if is_fused(denoiser):
            raise ValueError(f"load_lora: the {type(denoiser).__name__}'s attention q/k/v are fused into to_qkv "
                             f"(svdquant_ops.fuse_qkv), and the LoRA targets the unfused linears (e.g. "
                             f"{missing[:3]}); call svdquant_ops.unfuse_qkv(model) before loading it")
        raise ValueError(f"load_lora: {len(missing)} of the LoRA's {len(layers)} target modules are not in the "
                         f"{type(denoiser).__name__}, e.g. {missing[:5]} (is the LoRA for another model?)")
    layers = _split_inputs(modules, layers)
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in layers if not isinstance(modules[n], nn.Linear)]
    if wrong:
        raise ValueError(f"load_lora: LoRA on linears only; these targets are not nn.Linear: {wrong[:5]}")
    out, bad = {}, []
    for name, layer in layers.items():
        m = modules[name]
        n, k = m.weight.shape
        if layer.down.shape[1] != k or layer.up.shape[0] != n:
            bad.append(f"{name}: lora_A {list(layer.down.shape)}, lora_B {list(layer.up.shape)} vs the layer's "
                       f"[out_features, in_features] = [{n}, {k}]")
        out[m] = (name, layer)
    if bad:
        raise ValueError(f"load_lora: {len(bad)} LoRA shapes do not match the model (is the LoRA for another "
                         f"model, or another size of it?): " + "; ".join(bad[:5]))
    return out


def _split_inputs(modules: dict, layers: dict[str, LoraLayer]) -> dict[str, LoraLayer]:
    """A target that is one linear over input parts held by several linears (``lora_parts()``: (child name, input
    slice) pairs, e.g. an imported Nunchaku single block's ``proj_out``) gets one LoRA per part: A's columns of that
    slice with the same B, since B·A·x = Σ B·A[:, part]·x[part]."""
    out = {}
    for name, layer in layers.items():
        parts = getattr(modules.get(name), "lora_parts", None)
        if parts is None:
            out[name] = layer
            continue
        k = modules[name].in_features
        if layer.down.shape[1] != k:
            raise ValueError(f"load_lora: {name}: lora_A {list(layer.down.shape)} does not match in_features {k}")
        for child, cols in parts():
            out[f"{name}.{child}"] = LoraLayer(layer.down[:, cols], layer.up, layer.scale)
    return out


def _svdquant_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) and isinstance(m.weight, SVDQuantTensor)]


def _group_of(st: _State, model: nn.Module, module: nn.Linear, cache: dict) -> _FusedGroup:
    """The group already holding adapters that ``module`` belongs to, or a new one (not yet in ``st``): every
    SVDQuant linear of the model holding the very same ``proj_down``."""
    for g in st.groups + cache.setdefault("new", []):
        if any(m is module for m in g.members):
            return g
    if "linears" not in cache:
        cache["linears"] = _svdquant_linears(model)
    pd, sm = module.weight.proj_down, module.weight.smooth
    # the linears holding the very same λ and down projection objects (share_inputs): the rebuild gives them one
    # smooth, so a member given a λ of its own since is not part of the group
    g = _FusedGroup([m for m in cache["linears"] if m.weight.proj_down is pd and m.weight.smooth is sm], pd.shape[1])
    cache["new"].append(g)
    return g


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One tensor: the same object, or the same view of one memory (a weight unwrapped for compile with its own parts
    packed rebuilds them as new views at each read, integrations.unwrap)."""
    return a is b or (a.data_ptr() == b.data_ptr() and a.device == b.device and a.dtype == b.dtype
                      and a.shape == b.shape and a.stride() == b.stride())


def _check_group(g: _FusedGroup) -> None:
    want = g.base_rank + sum(s.width for s in g.segments)
    for m in g.members:
        w = m.weight
        if not isinstance(w, SVDQuantTensor) or w.proj_down.shape[1] != want or w.proj_up.shape[1] != want:
            raise RuntimeError("svdquant_ops.lora: a quantized linear holding LoRA adapters was replaced since they "
                               f"were loaded (expected an SVDQuantTensor of rank {want}, found "
                               f"{type(w).__name__}); reloading weights or re-quantizing drops the adapters' state: "
                               "unload_lora first")
    first = g.members[0].weight
    if any(not _same_memory(m.weight.smooth, first.smooth) or not _same_memory(m.weight.proj_down, first.proj_down)
           for m in g.members):
        # the rebuild gives every member the first one's λ and down projection: one that got its own since (a load
        # into it) would silently take another's
        raise RuntimeError("svdquant_ops.lora: the linears of a LoRA group no longer share their λ / down projection "
                           "(a load_state_dict or an assignment gave one of them its own since the adapters were "
                           "loaded), so the branch cannot be rebuilt; unload_lora before changing the weights of "
                           "linears that hold adapters")


def _scaled(up: torch.Tensor, scale: float, dtype: torch.dtype, device) -> torch.Tensor:
    """``scale·up`` rounded once to the model dtype (the product in fp32)."""
    return (up.to(device, torch.float32) * scale).to(dtype)


def _install(g: _FusedGroup, keep: list[_Segment], new: _Segment | None, new_down: torch.Tensor | None,
             scales: dict[str, float]) -> None:
    """Rebuild the group's branch: the model's own columns, the kept segments' current columns, the new segment."""
    _check_group(g)
    first = g.members[0].weight
    pd_cur = first.proj_down
    spans = [(g.offset(s), s.width) for s in keep]
    with torch.inference_mode(False), torch.no_grad():
        downs = [pd_cur[:, :g.base_rank]] + [pd_cur[:, o:o + w] for o, w in spans]
        if new is not None:
            downs.append(new_down.to(pd_cur.device, pd_cur.dtype))
        proj_down = torch.cat(downs, dim=1).contiguous()
        smooth = first.smooth
        if len(g.members) > 1:  # one object for the group, as share_inputs made it (storage.shared_moves)
            mark_shared(proj_down)
        for i, m in enumerate(g.members):
            w = m.weight
            ups = [w.proj_up[:, :g.base_rank]] + [w.proj_up[:, o:o + wd] for o, wd in spans]
            if new is not None:
                z = torch.zeros(w.proj_up.shape[0], new.width, dtype=w.proj_up.dtype, device=w.proj_up.device)
                blk = new.blocks.get(i)
                if blk is not None:
                    z[:, blk.offset:blk.offset + blk.up.shape[1]] = _scaled(
                        blk.up, scales[new.adapter] * blk.factor, z.dtype, z.device)
                ups.append(z)
            proj_up = torch.cat(ups, dim=1).contiguous()
            qt = SVDQuantTensor(w.codes, w.scales, smooth, proj_down, proj_up, w.precision, w.act_unsigned,
                                w.layout_version, w.dtype, global_scale=w.global_scale,
                                bias_correction=w.bias_correction)
            m.weight = nn.Parameter(qt, requires_grad=False)
    g.segments = keep + ([new] if new is not None else [])


def _side_install(m: nn.Linear, side: _SideBranch, keep: list[_SideSegment], new: list[_SideSegment],
                  new_downs: list[torch.Tensor], scales: dict[str, float]) -> None:
    dtype, device = m.weight.dtype, m.weight.device
    with torch.inference_mode(False), torch.no_grad():
        if side.segments:
            down_cur, up_cur = getattr(m, SIDE_DOWN), getattr(m, SIDE_UP)
        downs, ups, off = [], [], 0
        for s in keep:
            r = s.up.shape[1]
            downs.append(down_cur[s.offset:s.offset + r])
            ups.append(up_cur[:, s.offset:s.offset + r])
            s.offset = off
            off += r
        for s, d in zip(new, new_downs):
            downs.append(d.to(device, dtype))
            ups.append(_scaled(s.up, scales[s.adapter] * s.factor, dtype, device))
            s.offset = off
            off += d.shape[0]
        if off == 0:
            side.handle.remove()
            for name in (SIDE_DOWN, SIDE_UP):
                delattr(m, name)
            side.segments = []
            return
        m.register_buffer(SIDE_DOWN, torch.cat(downs, 0).contiguous(), persistent=False)
        m.register_buffer(SIDE_UP, torch.cat(ups, 1).contiguous(), persistent=False)
    if side.handle is None:
        side.handle = m.register_forward_hook(side)
    side.segments = keep + new


def _cannot_save_pretrained(*args, **kwargs):
    # A side branch lives in non-persistent buffers and a hook, which no saved model holds, while fused adapters are
    # in the weights: the model would load back with some of its adapters and not others.
    raise RuntimeError("svdquant_ops: this model holds LoRA adapters as side branches, which save_pretrained cannot "
                       "write (it would load back with the fused adapters but without these); call "
                       "svdquant_ops.lora.unload_lora(model) before saving")


def _guard_saving(denoiser: nn.Module, st: _State) -> None:
    """An instance ``save_pretrained`` that refuses while a side branch exists (``pipe.save_pretrained`` calls it
    too); ``state_dict()`` itself stays available (accelerate's offloading reads it)."""
    own = denoiser.__dict__.get("save_pretrained")
    if st.sides and own is None:
        denoiser.save_pretrained = _cannot_save_pretrained
    elif not st.sides and own is _cannot_save_pretrained:
        del denoiser.save_pretrained


def load_lora(model, path_or_state_dict, adapter_name: str, scale: float = 1.0, *,
              max_fused_rank: int | None = FUSED_RANK_LIMIT, **load_kwargs) -> dict[str, int]:
    """Load a LoRA into ``model`` (a quantized denoiser, or a pipeline: its denoiser) as adapter ``adapter_name``
    with strength ``scale``, without requantizing. Returns how many linears got it fused into their SVDQuant branch
    (``"fused"``) and as a side branch (``"side"``: 16-bit and weight-only linears, and SVDQuant linears whose branch
    would exceed ``max_fused_rank``; None: no limit). ``load_kwargs`` go to diffusers' ``lora_state_dict``
    (``weight_name``, ``subfolder``, ...). A compiled model recompiles once (the branch's rank changes)."""
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError(f"load_lora: adapter_name must be a non-empty string, got {adapter_name!r}")
    denoiser, _ = _split_model(model)
    refuse_unwrapped(denoiser, "load_lora")
    st = _state(denoiser) or _State()
    if adapter_name in st.scales:
        raise ValueError(f"load_lora: an adapter named {adapter_name!r} is already loaded; unload_lora(model, "
                         f"{adapter_name!r}) first or choose another name (loaded: {list(st.scales)})")
    scale = _strength(scale, "load_lora")
    if max_fused_rank is not None:
        what = "load_lora: max_fused_rank must be None or an int >= 0 (the SVDQuant branch's largest rank with " \
               f"adapters fused), got {max_fused_rank!r}"
        if isinstance(max_fused_rank, bool):
            raise TypeError(what)
        try:
            max_fused_rank = operator.index(max_fused_rank)
        except TypeError:
            raise TypeError(what) from None
        if max_fused_rank < 0:
            raise ValueError(what)
    targets = _resolve(denoiser, read_lora(model, path_or_state_dict, **load_kwargs))
    fused_by_group: dict[int, tuple[_FusedGroup, list]] = {}
    side_targets = []
    cache: dict = {}
    for m, (name, layer) in targets.items():
        if isinstance(m.weight, SVDQuantTensor):
            g = _group_of(st, denoiser, m, cache)
            fused_by_group.setdefault(id(g), (g, []))[1].append((m, layer))
        else:
            side_targets.append((m, layer))
    plans = []
    for g, items in fused_by_group.values():
        _check_group(g)
        dtype = g.members[0].weight.proj_down.dtype
        distinct: list[tuple[int, torch.Tensor]] = []  # (column, A [r, K]): equal A appended once
        blocks = {}
        col = 0
        for m, layer in items:
            a = layer.down.to(dtype)
            j = next((o for o, d in distinct if d.shape == a.shape and torch.equal(d, a)), None)
            if j is None:
                distinct.append((col, a))
                j = col
                col += a.shape[0]
            blocks[g.members.index(m)] = _Block(j, layer.up.to(m.weight.device, copy=True), layer.scale)
        width = -(-col // RANK_MULTIPLE) * RANK_MULTIPLE
        rank_now = g.base_rank + sum(s.width for s in g.segments)
        if max_fused_rank is not None and rank_now + width > max_fused_rank:
            side_targets.extend(items)
            log.info("svdquant_ops: adapter %r on %d linears as a side branch: their SVDQuant branch would grow to "
                     "rank %d > max_fused_rank=%d", adapter_name, len(items), rank_now + width, max_fused_rank)
            continue
        down = torch.cat([d for _, d in distinct], 0).T  # [K, col]
        down = F.pad(down, (0, width - col))
        plans.append((g, _Segment(adapter_name, width, blocks), down))
    st.scales[adapter_name] = scale
    denoiser.__dict__[STATE_ATTR] = st  # a plain attribute: not a submodule, not in the state dict
    for g, seg, down in plans:
        if not any(g is h for h in st.groups):
            st.groups.append(g)
        _install(g, list(g.segments), seg, down, st.scales)
    side_new: dict[nn.Module, tuple[list, list]] = {}
    for m, layer in side_targets:
        segs, downs = side_new.setdefault(m, ([], []))
        segs.append(_SideSegment(adapter_name, 0, layer.up.to(m.weight.device, copy=True), layer.scale))
        downs.append(layer.down)
    for m, (segs, downs) in side_new.items():
        side = st.sides.setdefault(m, _SideBranch())
        _side_install(m, side, list(side.segments), segs, downs, st.scales)
    _guard_saving(denoiser, st)
    counts = {"fused": sum(len(seg.blocks) for _, seg, _ in plans), "side": len(side_targets)}
    log.info("svdquant_ops: adapter %r loaded: %d linears fused into the SVDQuant branch, %d as a side branch",
             adapter_name, counts["fused"], counts["side"])
    return counts


def _known(st: _State | None, adapter_name: str, what: str) -> _State:
    if st is None or adapter_name not in st.scales:
        loaded = list(st.scales) if st is not None else []
        raise KeyError(f"{what}: no adapter named {adapter_name!r} is loaded (loaded: {loaded})")
    return st


def _strength(scale, fn: str) -> float:
    return _finite_number(scale, f"{fn}: scale must be a finite number (the adapter's strength)")


@torch.no_grad()
def set_lora_scale(model, adapter_name: str, scale: float) -> None:
    """Set adapter ``adapter_name``'s strength: writes ``scale·a/r·B`` into its columns in place (no new tensors,
    no recompile under torch.compile; a captured CUDA graph uses it at its next replay)."""
    denoiser, _ = _split_model(model)
    st = _known(_state(denoiser), adapter_name, "set_lora_scale")
    scale = _strength(scale, "set_lora_scale")
    st.scales[adapter_name] = scale
    for g in st.groups:
        for seg in g.segments:
            if seg.adapter != adapter_name:
                continue
            _check_group(g)
            off = g.offset(seg)
            for i, blk in seg.blocks.items():
                pu = g.members[i].weight.proj_up
                if blk.up.device != pu.device:  # the model moved since loading: follow it
                    blk.up = blk.up.to(pu.device)
                c0 = off + blk.offset
                pu[:, c0:c0 + blk.up.shape[1]].copy_(_scaled(blk.up, scale * blk.factor, pu.dtype, pu.device))
    for m, side in st.sides.items():
        for s in side.segments:
            if s.adapter == adapter_name:
                up = getattr(m, SIDE_UP)
                if s.up.device != up.device:
                    s.up = s.up.to(up.device)
                cols = slice(s.offset, s.offset + s.up.shape[1])
                up[:, cols].copy_(_scaled(s.up, scale * s.factor, up.dtype, up.device))


def set_adapters(model, adapter_names, weights=None) -> None:
    """diffusers' ``set_adapters`` semantics: the named adapters get ``weights`` (one per name, one for all, or 1.0),
    every other loaded adapter strength 0 (it stays loaded; ``unload_lora`` removes its columns)."""
    denoiser, _ = _split_model(model)
    st = _state(denoiser)
    names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (int, float)):
        weights = [float(weights)] * len(names)
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"set_adapters: {len(names)} adapter names but {len(weights)} weights")
    for n in names:
        _known(st, n, "set_adapters")
    chosen = dict(zip(names, weights))
    for n in list(st.scales if st else []):
        set_lora_scale(denoiser, n, chosen.get(n, 0.0))


def lora_scales(model) -> dict[str, float]:
    """The loaded adapters and their strengths, in load order."""
    denoiser, _ = _split_model(model)
    st = _state(denoiser)
    return dict(st.scales) if st is not None else {}


def unload_lora(model, adapter_name: str | None = None) -> None:
    """Remove adapter ``adapter_name`` (all adapters when None). The SVDQuant branch gets its original values back
    bit for bit; side branches are removed with their hooks. A compiled model recompiles once."""
    denoiser, _ = _split_model(model)
    refuse_unwrapped(denoiser, "unload_lora")
    st = _state(denoiser)
    if adapter_name is None:
        names = list(st.scales) if st is not None else []
    else:
        _known(st, adapter_name, "unload_lora")
        names = [adapter_name]
    if not names:
        return
    for g in list(st.groups):
        keep = [s for s in g.segments if s.adapter not in names]
        if len(keep) != len(g.segments):
            _install(g, keep, None, None, st.scales)
        if not g.segments:
            st.groups.remove(g)
    for m, side in list(st.sides.items()):
        keep = [s for s in side.segments if s.adapter not in names]
        if len(keep) != len(side.segments):
            _side_install(m, side, keep, [], [], st.scales)
        if not side.segments:
            del st.sides[m]
    for n in names:
        del st.scales[n]
    _guard_saving(denoiser, st)
    if not st.scales:
        del denoiser.__dict__[STATE_ATTR]


# ------------------------------------------------------------------------------------------------------------------
# diffusers' pipeline API
# ------------------------------------------------------------------------------------------------------------------
def enable_pipeline_lora(pipe) -> None:
    """Route the pipeline's own LoRA methods to these functions, for this pipeline object only (instance attributes;
    the class is untouched): ``pipe.load_lora_weights(path, adapter_name=None, **kw)``, ``pipe.set_adapters(names,
    adapter_weights=None)``, ``pipe.unload_lora_weights()``, ``pipe.delete_adapters(names)``,
    ``pipe.get_active_adapters()``, and ``pipe.fuse_lora`` / ``unfuse_lora`` as no-ops (adapters on quantized layers
    are already part of the fused branch). diffusers' own versions need PEFT and wrap the quantized layers in
    PEFT's layers (a separate 16-bit branch, a recompile per strength change)."""

    def load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        kwargs.pop("hotswap", None)
        kwargs.pop("low_cpu_mem_usage", None)
        if adapter_name is None:
            i = 0
            while f"default_{i}" in lora_scales(pipe):
                i += 1
            adapter_name = f"default_{i}"
        load_lora(pipe, pretrained_model_name_or_path_or_dict, adapter_name, **kwargs)

    def set_adapters_(adapter_names, adapter_weights=None):
        set_adapters(pipe, adapter_names, adapter_weights)

    def delete_adapters(adapter_names):
        for n in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            unload_lora(pipe, n)

    def fuse_lora(*args, **kwargs):
        log.info("svdquant_ops: fuse_lora is a no-op: adapters on SVDQuant layers already run inside the branch")

    methods = dict(load_lora_weights=load_lora_weights, set_adapters=set_adapters_,
                   unload_lora_weights=lambda *a, **k: unload_lora(pipe), delete_adapters=delete_adapters,
                   get_active_adapters=lambda: [n for n, s in lora_scales(pipe).items() if s != 0],
                   get_list_adapters=lambda: {"transformer": list(lora_scales(pipe))},
                   fuse_lora=fuse_lora, unfuse_lora=fuse_lora)
    for name, fn in methods.items():
        object.__setattr__(pipe, name, fn)


def has_lora(module: nn.Module) -> bool:
    """Whether ``module`` (a denoiser) holds adapters loaded by ``load_lora``."""
    return _state(module) is not None


__all__ = ["load_lora", "set_lora_scale", "unload_lora", "set_adapters", "lora_scales", "read_lora", "LoraLayer",
           "enable_pipeline_lora", "has_lora", "FUSED_RANK_LIMIT"]
