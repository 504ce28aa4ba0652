"""svdquant::gemm_cat called directly with lists of unequal length, on CPU tensors: it raised the length error under
torch 2.11 / 2.13 CPU builds and crashed (segfault) under torch 2.11+cu130 on the GPU machine. Run under gdb there
for the native stack (gpu_run.sh is not needed: the op library must be built, SVDQUANT_OPS_CACHE set)."""
import sys

import torch

sys.path.insert(0, ".")
from svdquant_ops import ops  # noqa: E402
from tests.builders import gemm_inputs, generator, weight_inputs  # noqa: E402

ops.load()
gen = generator(("segv",))
a = gemm_inputs((3,), 24, 128, 16, "w4a8", torch.bfloat16, gen, bias=True)
b = weight_inputs(40, 128, 16, "w4a8", torch.bfloat16, gen, bias=True)
for case, bias in (("two biases", [a["bias"], b["bias"]]), ("one bias", [a["bias"]])):
    print(case, flush=True)
    try:
        out = torch.ops.svdquant.gemm_cat(a["act_codes"], a["act_scales"], [a["codes"], b["codes"]],
                                          [a["scales"], b["scales"]], [a["global_scale"], b["global_scale"]],
                                          a["down_act"], [a["proj_up"], b["proj_up"]], bias, "w4a8", torch.bfloat16)
        print("  ok", tuple(out.shape), flush=True)
    except RuntimeError as e:
        print("  raised:", str(e).splitlines()[0], flush=True)
