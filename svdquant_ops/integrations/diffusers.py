"""Model-family knowledge for diffusers models (and models that follow its naming): which linears stay 16-bit,
which share a low-rank down projection, which read a GELU's output. All of it is recorded on the modules by
``prepare_model``; the algorithm only reads the records (``quantize/structure.py``).
"""

from __future__ import annotations

import fnmatch

from torch import nn

from ..quantize.structure import link_branches, mark, module_name, record_names

KEEP, WEIGHT_ONLY = "keep", "weight_only"  # the roles a family rule gives a linear (SVDQuant otherwise)

# The model-family rules, as (fnmatch pattern over the module name, role, reason); the first match wins. Embedders
# and the final projection stay 16-bit: they see one token per sample or shape the output directly, so 4-bit buys
# little there and costs accuracy. AdaLN modulation linears also see one token per sample but hold a quarter of
# FLUX.1's weights: 4-bit weights with 16-bit activations (SVDQuantConfig.weight_only). Used with skip=None.
DEFAULT_RULES = (
    ("time_embed.linear", WEIGHT_ONLY, "AdaLN modulation"),  # SANA's AdaLayerNormSingle (before *embed*)
    ("*embed*", KEEP, "embedder"),  # FLUX, SD3, SANA, PixArt, Wan (condition_embedder), SDXL (time / add_embedding)
    ("caption_projection.*", KEEP, "embedder"),  # SANA's and PixArt's text input projection (FLUX: context_embedder)
    ("img_in", KEEP, "embedder"),  # Qwen-Image's input projections
    ("txt_in", KEEP, "embedder"),
    ("*norm*.linear", WEIGHT_ONLY, "AdaLN modulation"),  # FLUX norm1 / norm1_context / norm, SD3, norm_out
    ("norm_out.*", WEIGHT_ONLY, "AdaLN modulation"),
    ("*adaln*.linear", WEIGHT_ONLY, "AdaLN modulation"),  # PixArt's adaln_single
    ("*.img_mod.*", WEIGHT_ONLY, "AdaLN modulation"),  # Qwen-Image's per-block modulation
    ("*.txt_mod.*", WEIGHT_ONLY, "AdaLN modulation"),
    ("*.time_emb_proj", WEIGHT_ONLY, "AdaLN modulation"),  # the SDXL UNet's per-resnet time projection
    ("proj_out", KEEP, "final projection"),
)


def structural_role(parents: list[nn.Module], siblings: list[nn.Module], index: int) -> tuple[str, str] | None:
    """The role of a linear no name rule matched, from where it sits, so that models with unknown names get the
    same treatment: ``parents`` are its enclosing modules from the root down, ``siblings`` its parent's children
    (it is ``siblings[index]``). Diffusers' AdaLN classes (``AdaLayerNorm*``) and exactly ``Sequential(SiLU,
    Linear)`` modulate: weight-only; anything inside an ``*Embedding*`` class embeds: 16-bit; a linear directly under the root
    model is an input or output projection outside the blocks: 16-bit."""
    if type(parents[-1]).__name__.startswith("AdaLayerNorm"):
        return WEIGHT_ONLY, "AdaLN modulation (AdaLayerNorm class)"
    if (isinstance(parents[-1], nn.Sequential) and len(siblings) == 2 and index == 1
            and isinstance(siblings[0], nn.SiLU)):  # exactly Sequential(SiLU, Linear): an MLP's SiLU is not one
        return WEIGHT_ONLY, "AdaLN modulation (SiLU then linear)"
    if any("Embedding" in type(p).__name__ for p in parents):
        return KEEP, "embedder (Embedding class)"
    if len(parents) == 1:
        return KEEP, "input / output projection (outside the blocks)"
    return None


# q/k/v of one attention share one low-rank down projection (one SVD of the row-stacked weights), as in the
# reference; diffusers' joint attention has a second, text-stream set. Fused (diffusers' fuse_qkv_projections or
# fusion.fuse_qkv), each set is one linear.
_QKV = {"to_q": "qkv", "to_k": "qkv", "to_v": "qkv", "to_qkv": "qkv",
        "add_q_proj": "added_qkv", "add_k_proj": "added_qkv", "add_v_proj": "added_qkv", "to_added_qkv": "added_qkv"}
_PASS_THROUGH = (nn.Dropout, nn.Identity)
# Blocks whose attention q/k/v and MLP-in projection read the same normalized input (one input group).
_SINGLE_STREAM_BLOCKS = ("FluxSingleTransformerBlock",)


def input_group_key(parents: list[nn.Module], module: nn.Module, child_name: str) -> str | None:
    """The input-group key of linear ``child_name`` of ``module`` (``parents`` from the root down, ending with
    ``module``): the linears with one key read the very same tensor in diffusers' forward."""
    kind = _QKV.get(child_name)
    if type(module).__name__ in _SINGLE_STREAM_BLOCKS and child_name == "proj_mlp":
        return f"{module_name(module)}:single_input"
    if kind == "qkv" and len(parents) >= 2 and type(parents[-2]).__name__ in _SINGLE_STREAM_BLOCKS:
        return f"{module_name(parents[-2])}:single_input"
    return f"{module_name(module)}:{kind}" if kind else None


def is_gelu(module: nn.Module) -> bool:
    """A module whose output is GELU(x) >= -0.17: torch's GELU and diffusers' GELU / ApproximateGELU (projection
    then GELU). GEGLU / SwiGLU multiply by a gate, so their outputs can be anywhere: not GELU."""
    if isinstance(module, nn.GELU):
        return True
    return type(module).__name__ in ("GELU", "ApproximateGELU") and type(module).__module__.startswith("diffusers")


def rule_for(name: str) -> tuple[str, str] | None:
    """The (role, reason) of the first name rule matching ``name``, or None."""
    return next(((role, reason) for pattern, role, reason in DEFAULT_RULES if fnmatch.fnmatchcase(name, pattern)),
                None)


def prepare_model(model: nn.Module) -> nn.Module:
    """Record on every linear of ``model`` its name, whether a GELU feeds it, its branch-sharing key and its role:
    kept in 16-bit or weight-only by the first matching name rule (``DEFAULT_RULES``), else by where it sits
    (``structural_role``), else SVDQuant. Idempotent; ``quantize_model`` and ``calibrate`` call it. Names given
    while preparing an enclosing model are kept (``record_names``), so a block of a prepared model keeps
    ``blocks.0.proj_out`` and is not mistaken for the final ``proj_out``."""
    if not isinstance(model, nn.Module):
        hint = ("; pass its denoiser (pipe.transformer or pipe.unet)" if hasattr(model, "components") else "")
        raise TypeError(f"svdquant_ops: model must be a torch.nn.Module, got {type(model).__name__}{hint}")
    record_names(model)
    # "Outside the blocks" needs blocks: a root with a block list (not a lone block) and that is not itself a named
    # part of a larger prepared model.
    has_blocks = module_name(model) == "" and any(isinstance(c, nn.ModuleList) for c in model.children())

    def walk(module: nn.Module, parents: list[nn.Module]) -> None:
        fqn = module_name(module)
        children = list(module.named_children())
        siblings = [c for _, c in children]
        for i, (child_name, child) in enumerate(children):
            if not isinstance(child, nn.Linear):
                walk(child, parents + [child])
                continue
            gelu = False
            if isinstance(module, (nn.Sequential, nn.ModuleList)):
                j = i - 1
                while j >= 0 and isinstance(children[j][1], _PASS_THROUGH):
                    j -= 1
                gelu = j >= 0 and is_gelu(children[j][1])
            kind = _QKV.get(child_name)
            role = rule_for(module_name(child)) or structural_role(parents, siblings, i)
            if role is not None and role[1].startswith("input / output") and not has_blocks:
                role = None
            role_kw = {} if role is None else {"keep_reason" if role[0] == KEEP else "weight_only_reason": role[1]}
            mark(child, gelu_fed=gelu, branch_key=f"{fqn}:{kind}" if kind else None,
                 input_group=input_group_key(parents, module, child_name), **role_kw)

    walk(model, [model])
    link_branches(model)
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
    model-family name rules while loading: ``TorchAoConfig(FqnToConfig)`` mapping each ``DEFAULT_RULES`` pattern (as
    a regex over module names, which diffusers resolves per parameter) to None (kept 16-bit) or ``W4A16Config()``
    (weight-only; None when ``config.weight_only`` is None), and everything else to ``config`` (default
    ``SVDQuantConfig(**options)``). A ``config.skip`` list replaces the rules: those names stay 16-bit. It survives ``save_pretrained`` / ``from_pretrained``.

    diffusers quantizes each linear alone while loading, so what needs the module tree cannot apply on this path:
    the structural rules for names no rule knows, and the detection of GELU-fed inputs (with
    ``act_unsigned="auto"`` this path uses signed INT4 everywhere). ``quantize_model`` after loading has both."""
    import dataclasses

    from diffusers import TorchAoConfig
    from torchao.quantization import FqnToConfig

    from ..quantize.config import SVDQuantConfig
    from ..quantize.weight_only import W4A16Config

    if config is None:
        config = SVDQuantConfig(**options)
    elif options:
        raise TypeError(f"quantization_config: pass either config or options, not both (got {sorted(options)})")
    unsigned = False if config.act_unsigned == "auto" else config.act_unsigned
    per_layer = dataclasses.replace(config, skip=[], act_unsigned=unsigned)  # names are resolved by diffusers here
    weight_only = W4A16Config() if config.weight_only else None
    # torchao tries regexes on parameter names ("x.weight") before module names, applying every match; the
    # lookahead restricts each rule to module names, where the first match wins, as in prepare_model.
    module_only = r"(?!.*\.(?:weight|bias)\Z)"
    if config.skip is None:
        table = {"re:" + module_only + fnmatch.translate(pattern): (weight_only if role == WEIGHT_ONLY else None)
                 for pattern, role, _ in DEFAULT_RULES}
    else:  # explicit patterns replace the family's rules, as in quantize_model
        table = {"re:" + module_only + fnmatch.translate(pattern): None for pattern in config.skip}
    table["_default"] = per_layer
    return TorchAoConfig(FqnToConfig(table))
