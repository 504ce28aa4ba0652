"""What the algorithm knows about a model's structure: facts recorded on the modules themselves.

torchao calls the quantization handler with one module and no context, so facts that need the whole model are
attached to each ``nn.Linear`` beforehand. This module defines the facts and reads them; it knows no model family.
The model-family knowledge that *decides* them (diffusers' q/k/v names, its GELU modules, which layers stay 16-bit)
lives in ``svdquant_ops.integrations`` (``prepare_model``), which records:

* the module's fully qualified name (``record_names``),
* whether its input comes straight from a GELU (then the unsigned INT4 variant is valid: GELU(x) >= -0.17),
* a branch-sharing key: linears with the same key (q/k/v of one attention) share one low-rank down projection,
  and (``link_branches``) the group of linears with that key, so the data-free path decomposes them together,
* an input-group key: linears with the same key read the same tensor (q/k/v; a FLUX single block's q/k/v and
  MLP-in projection), so ``sharing.share_inputs`` can give them one λ and one down projection,
* the reason to keep it in 16-bit, when the model family says so (embedders, final projection),
* the reason to give it 4-bit weights only (16-bit activations), when the model family says so (AdaLN modulation),
* that the model was prepared at all (so the handler can tell "no reason to keep" from "nobody looked").

Which linears share an *input* (and hence λ) is not guessed from names: ``calibrate`` observes it, as the
linears that receive the very same tensor object in a forward call.
"""

from __future__ import annotations

from torch import nn

FQN_ATTR = "_svdquant_fqn"
GELU_ATTR = "_svdquant_gelu_input"
BRANCH_ATTR = "_svdquant_branch_key"
KEEP_ATTR = "_svdquant_keep_reason"
WEIGHT_ONLY_ATTR = "_svdquant_weight_only_reason"
PREPARED_ATTR = "_svdquant_prepared"
INPUT_GROUP_ATTR = "_svdquant_input_group"  # linears with the same key read the same tensor (structure)
CALIBRATED_GROUP_ATTR = "_svdquant_calibrated_group"  # set when a recorded group is solved (calibration)
BRANCH_GROUP_ATTR = "_svdquant_branch_group"  # the LinkedGroup of the linears sharing this one's branch key


def record_names(model: nn.Module) -> nn.Module:
    """Record each submodule's fully qualified name on it. A name recorded from an enclosing model is kept: when a
    submodule is named on its own later, its relative names (``proj_out``) are suffixes of the recorded full ones
    (``single_transformer_blocks.0.proj_out``), and a longer name that ends with a recorded one replaces it."""
    for fqn, module in model.named_modules():
        old = getattr(module, FQN_ATTR, None)
        if old is not None and (old == fqn or (old and fqn == "") or old.endswith("." + fqn)):
            continue  # already named, possibly from an enclosing model: keep the full name
        setattr(module, FQN_ATTR, fqn)
    return model


def mark(module: nn.Module, *, gelu_fed: bool = False, branch_key: str | None = None,
         keep_reason: str | None = None, weight_only_reason: str | None = None, input_group: str | None = None) -> None:
    """Record the structure facts of one linear (called by the integrations' ``prepare_model``)."""
    if keep_reason and weight_only_reason:
        raise ValueError("mark: a linear is either kept in 16-bit or weight-only, not both")
    setattr(module, GELU_ATTR, bool(gelu_fed))
    setattr(module, BRANCH_ATTR, branch_key)
    setattr(module, KEEP_ATTR, keep_reason)
    setattr(module, WEIGHT_ONLY_ATTR, weight_only_reason)
    setattr(module, INPUT_GROUP_ATTR, input_group)
    setattr(module, PREPARED_ATTR, True)


class LinkedGroup:
    """The linears of one model that share a branch key (q/k/v of one attention), so that the data-free path can
    decompose them together (one SVD of the stacked weights) although torchao hands the handler one linear at a
    time. ``solved``: member -> SVDQuantTensor, filled when the first member is quantized."""

    def __init__(self, key: str, members: list):
        self.key = key
        self.members = members
        self.solved: dict = {}
        self.solved_config = None

    def __deepcopy__(self, memo):  # copied with the model: members map to the copies, results are not copied
        import copy

        return LinkedGroup(self.key, copy.deepcopy(self.members, memo))


def link_branches(model: nn.Module) -> None:
    """Give every linear with a branch key the ``LinkedGroup`` of all linears of ``model`` with that key."""
    groups: dict = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and branch_key(module) is not None:
            groups.setdefault(branch_key(module), []).append(module)
    for key, members in groups.items():
        old = getattr(members[0], BRANCH_GROUP_ATTR, None)
        if old is not None and old.members == members and all(
                getattr(m, BRANCH_GROUP_ATTR, None) is old for m in members):
            continue  # idempotent: keep any results in flight
        group = LinkedGroup(key, members)
        for m in members:
            object.__setattr__(m, BRANCH_GROUP_ATTR, group)


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


def input_group(module: nn.Module) -> str | None:
    """The key of the linears that read the very same input tensor: the group calibration solved together, else
    the model family's structural group (``prepare_model``), else None."""
    return getattr(module, CALIBRATED_GROUP_ATTR, None) or getattr(module, INPUT_GROUP_ATTR, None)


def branch_group(module: nn.Module):
    return getattr(module, BRANCH_GROUP_ATTR, None)


def keep_reason(module: nn.Module) -> str | None:
    return getattr(module, KEEP_ATTR, None)


def weight_only_reason(module: nn.Module) -> str | None:
    return getattr(module, WEIGHT_ONLY_ATTR, None)


def prepared(module: nn.Module) -> bool:
    return bool(getattr(module, PREPARED_ATTR, False))
