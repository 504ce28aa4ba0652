"""Model-family knowledge for diffusers models (and models that follow its naming): which linears stay 16-bit,
which share a low-rank down projection, which read a GELU's output. All of it is recorded on the modules by
``prepare_model``; the algorithm only reads the records (``quantize/structure.py``).
"""

from __future__ import annotations

import fnmatch

from torch import nn

from ..quantize.structure import mark, module_name, record_names

# Linears SVDQuant keeps in 16-bit in diffusion transformers, as (fnmatch pattern over the module name, reason):
# they see one token per sample (embedders, AdaLN modulation) or shape the output directly (final projection), so
# 4-bit activations buy nothing there and cost accuracy. Used when SVDQuantConfig.skip is None.
DEFAULT_KEEP = (
    ("*embed*", "embedder"),  # FLUX, SD3, SANA, PixArt, Wan (condition_embedder), SDXL (time / add_embedding)
    ("img_in", "embedder"),  # Qwen-Image's input projections
    ("txt_in", "embedder"),
    ("*norm*.linear", "AdaLN modulation"),  # FLUX norm1 / norm1_context / norm, SD3, norm_out
    ("norm_out.*", "AdaLN modulation"),
    ("*adaln*.linear", "AdaLN modulation"),  # PixArt's adaln_single
    ("*.img_mod.*", "AdaLN modulation"),  # Qwen-Image's per-block modulation
    ("*.txt_mod.*", "AdaLN modulation"),
    ("*.time_emb_proj", "AdaLN modulation"),  # the SDXL UNet's per-resnet time projection
    ("proj_out", "final projection"),
)

# q/k/v of one attention share one low-rank down projection (one SVD of the row-stacked weights), as in the
# reference; diffusers' joint attention has a second, text-stream set.
_QKV = {"to_q": "qkv", "to_k": "qkv", "to_v": "qkv",
        "add_q_proj": "added_qkv", "add_k_proj": "added_qkv", "add_v_proj": "added_qkv"}
_PASS_THROUGH = (nn.Dropout, nn.Identity)


def is_gelu(module: nn.Module) -> bool:
    """A module whose output is GELU(x) >= -0.17: torch's GELU and diffusers' GELU / ApproximateGELU (projection
    then GELU). GEGLU / SwiGLU multiply by a gate, so their outputs can be anywhere: not GELU."""
    if isinstance(module, nn.GELU):
        return True
    return type(module).__name__ in ("GELU", "ApproximateGELU") and type(module).__module__.startswith("diffusers")


def keep_reason_for(name: str) -> str | None:
    return next((reason for pattern, reason in DEFAULT_KEEP if fnmatch.fnmatchcase(name, pattern)), None)


def prepare_model(model: nn.Module) -> nn.Module:
    """Record on every linear of ``model`` its name, whether a GELU feeds it, its branch-sharing key and whether the
    model family keeps it in 16-bit. Idempotent; ``quantize_model`` and ``calibrate`` call it. Names given while
    preparing an enclosing model are kept (``record_names``), so a block of a prepared model keeps
    ``blocks.0.proj_out`` and is not mistaken for the final ``proj_out``."""
    record_names(model)
    for module in model.modules():
        fqn = module_name(module)
        children = list(module.named_children())
        for i, (child_name, child) in enumerate(children):
            if not isinstance(child, nn.Linear):
                continue
            gelu = False
            if isinstance(module, (nn.Sequential, nn.ModuleList)):
                j = i - 1
                while j >= 0 and isinstance(children[j][1], _PASS_THROUGH):
                    j -= 1
                gelu = j >= 0 and is_gelu(children[j][1])
            kind = _QKV.get(child_name)
            child_fqn = module_name(child)
            mark(child, gelu_fed=gelu, branch_key=f"{fqn}:{kind}" if kind else None,
                 keep_reason=keep_reason_for(child_fqn))
    if isinstance(model, nn.Linear):  # a bare linear as the root: no context, nothing to keep
        mark(model)
    return model


def attach_to_diffusers(model: nn.Module, config, kept: list[str]) -> bool:
    """Make ``model.save_pretrained`` write a quantized model that ``from_pretrained`` loads back: attach the
    torchao quantizer diffusers would have attached had the model been quantized while loading (a pre-quantized
    one, so loading assigns the stored tensors instead of quantizing again). ``kept`` are the names of linears left
    in 16-bit. Returns False (and does nothing) for a model that is not a diffusers ``ModelMixin``."""
    try:
        from diffusers import ModelMixin, TorchAoConfig
        from diffusers.quantizers.torchao.torchao_quantizer import TorchAoHfQuantizer
    except ImportError:
        return False
    if not isinstance(model, ModelMixin):
        return False
    quantizer = TorchAoHfQuantizer(TorchAoConfig(config, modules_to_not_convert=list(kept)), pre_quantized=True)
    quantizer.validate_environment(device_map=None)  # sets the quantizer's offload state, as from_pretrained does
    # Not quantizer.preprocess_model: it also sets model.is_quantized, which makes diffusers refuse .to(dtype), a
    # move SVDQuantTensor supports. A model loaded back with from_pretrained does carry that flag (diffusers' rule).
    quantizer.modules_to_not_convert = list(kept)
    model.hf_quantizer = quantizer
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    model.register_to_config(quantization_config=quantizer.quantization_config, _pre_quantization_dtype=dtype)
    return True


def quantization_config(config=None, **options):
    """A diffusers ``quantization_config`` for ``from_pretrained(..., quantization_config=...)`` that applies the
    model-family rules while loading: ``TorchAoConfig(FqnToConfig)`` mapping each ``DEFAULT_KEEP`` pattern (as a
    regex over module names, which diffusers resolves per parameter) to None (kept 16-bit) and everything else to
    ``config`` (default ``SVDQuantConfig(**options)``). It survives ``save_pretrained`` / ``from_pretrained``.

    diffusers quantizes each linear alone while loading, so nothing can tell which inputs come from a GELU: with
    ``act_unsigned="auto"`` this path uses signed INT4 everywhere (``quantize_model`` after loading detects them)."""
    import dataclasses

    from diffusers import TorchAoConfig
    from torchao.quantization import FqnToConfig

    from ..quantize.config import SVDQuantConfig

    if config is None:
        config = SVDQuantConfig(**options)
    elif options:
        raise TypeError(f"quantization_config: pass either config or options, not both (got {sorted(options)})")
    unsigned = False if config.act_unsigned == "auto" else config.act_unsigned
    per_layer = dataclasses.replace(config, skip=[], act_unsigned=unsigned)  # names are resolved by diffusers here
    table = {"re:" + fnmatch.translate(pattern): None for pattern, _ in DEFAULT_KEEP}
    table["_default"] = per_layer
    return TorchAoConfig(FqnToConfig(table))
