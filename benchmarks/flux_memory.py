"""Weight memory of the FLUX.1-dev-architecture transformer (diffusers' default FluxTransformer2DModel config,
11.9 B parameters, seeded random bf16 weights built on the GPU) before and after ``quantize_model`` with the
default rules (SVDQuant for attention / MLP, 4-bit weight-only AdaLN, 16-bit embedders and final projection).
Bytes are counted by parts (``integrations.bench.weight_bytes``); quantization is data-free and needs no op library.

    python3 benchmarks/flux_memory.py [w4a8|int4|nvfp4 ...]
"""

from __future__ import annotations

import json
import sys
import time

import torch

from svdquant_ops import quantize_model
from svdquant_ops.integrations.bench import build_model, weight_bytes


def main(precisions: list[str]) -> None:
    for precision in precisions or ["w4a8"]:
        model = build_model("flux-dev", "cuda")
        before = weight_bytes(model)
        t0 = time.perf_counter()
        summary = quantize_model(model, precision=precision, rank=32)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        after = weight_bytes(model)
        print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "precision": precision,
                          "params": sum(p.numel() for p in model.parameters()),
                          "bytes_bf16": before, "bytes_quantized": after, "ratio": round(after / before, 4),
                          "gib_bf16": round(before / 2**30, 2), "gib_quantized": round(after / 2**30, 2),
                          "quantize_s": round(seconds, 1), "summary": str(summary)}), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main(sys.argv[1:])
