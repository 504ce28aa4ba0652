"""What the algorithm needs to know about a model's structure, recorded on the modules themselves.

torchao calls the quantization handler with one module and no context, so facts that need the whole model are
attached to each ``nn.Linear`` beforehand by :func:`annotate` (called by ``calibrate`` and ``name_modules``):

* its fully qualified name (for ``SVDQuantConfig.skip``),
* whether its input comes straight from a GELU (then the unsigned INT4 variant is valid: GELU(x) >= -0.17),
* a branch-sharing key: ``to_q``/``to_k``/``to_v`` (and ``add_{q,k,v}_proj``) of one attention share one low-rank
  down projection, as in the reference (one SVD of the row-stacked weights).

Which linears share an *input* (and hence λ) is not guessed from names: ``calibrate`` observes it, as the
linears that receive the very same tensor object in a forward call.
"""

from __future__ import annotations

from torch import nn

FQN_ATTR = "_svdquant_fqn"
GELU_ATTR = "_svdquant_gelu_input"
BRANCH_ATTR = "_svdquant_branch_key"

_QKV = {"to_q", "to_k", "to_v"}
_ADDED_QKV = {"add_q_proj", "add_k_proj", "add_v_proj"}
_PASS_THROUGH = (nn.Dropout, nn.Identity)


def _is_gelu(module: nn.Module) -> bool:
    if isinstance(module, nn.GELU):
        return True
    # diffusers.models.activations.GELU / ApproximateGELU: proj then GELU (output >= -0.17). GEGLU / SwiGLU
    # multiply by a gate, so their outputs can be anywhere: not GELU-fed.
    name = type(module).__name__
    return name in ("GELU", "ApproximateGELU") and type(module).__module__.startswith("diffusers")


def annotate(model: nn.Module, *, overwrite_names: bool = True) -> nn.Module:
    """Record names, GELU-fed inputs and branch-sharing keys on every submodule (idempotent).

    With ``overwrite_names=False`` a module keeps a name it already has, so annotating a submodule after its
    enclosing model does not replace full names by relative ones."""
    for fqn, module in model.named_modules():
        if overwrite_names or getattr(module, FQN_ATTR, None) is None:
            setattr(module, FQN_ATTR, fqn)
        children = list(module.named_children())
        for i, (child_name, child) in enumerate(children):
            if not isinstance(child, nn.Linear):
                continue
            if isinstance(module, (nn.Sequential, nn.ModuleList)):
                j = i - 1
                while j >= 0 and isinstance(children[j][1], _PASS_THROUGH):
                    j -= 1
                if j >= 0 and _is_gelu(children[j][1]):
                    setattr(child, GELU_ATTR, True)
            if child_name in _QKV or child_name in _ADDED_QKV:
                kind = "qkv" if child_name in _QKV else "added_qkv"
                setattr(child, BRANCH_ATTR, f"{fqn}:{kind}")
    return model


def module_name(module: nn.Module) -> str | None:
    return getattr(module, FQN_ATTR, None)


def describe(module: nn.Module) -> str:
    name = module_name(module)
    if name:  # the root module's name is ""
        return name
    if isinstance(module, nn.Linear):
        return f"{type(module).__name__}({module.in_features}->{module.out_features})"
    return type(module).__name__


def gelu_fed(module: nn.Module) -> bool:
    return bool(getattr(module, GELU_ATTR, False))


def branch_key(module: nn.Module) -> str | None:
    return getattr(module, BRANCH_ATTR, None)
