"""SVDQuant on the transformer beside torchao's own configs: weight-only int8 on the T5 text encoder, and
FqnToConfig choosing a config per layer.

    python integrations/mix_torchao.py [--model black-forest-labs/FLUX.1-dev]
"""

from __future__ import annotations

import torch
from _common import arguments, generate, load
from torchao.quantization import FqnToConfig, Int8WeightOnlyConfig, quantize_

import svdquant_ops
from svdquant_ops import SVDQuantConfig, SVDQuantTensor


def main() -> None:
    args = arguments(__doc__).parse_args()
    pipe, call = load(args)
    reference = generate(pipe, args, call, output_type="latent")
    # 1. the transformer with SVDQuant (model-family skip rules applied), the T5 encoder with int8 weight-only
    print(svdquant_ops.quantize_model(pipe.transformer, precision=args.precision))
    quantize_(pipe.text_encoder_2, Int8WeightOnlyConfig())
    both = generate(pipe, args, call, output_type="latent")
    snr = 10 * torch.log10(reference.float().pow(2).mean() / (reference.float() - both.float()).pow(2).mean())
    print(f"SVDQuant transformer + int8 T5: latents {snr:.1f} dB from 16-bit")
    # 2. per-layer choice with torchao's FqnToConfig (regex keys start with "re:")
    block = load(args)[0].transformer.transformer_blocks[0]
    svdquant_ops.prepare_model(block)  # names and structure for the SVDQuant handler (GELU-fed inputs)
    quantize_(block, FqnToConfig({"re:attn\\.to_[qkv]": SVDQuantConfig(precision=args.precision, skip=[]),
                                  "re:ff\\.net\\.2": Int8WeightOnlyConfig()}), filter_fn=None)
    kinds = {n: type(m.weight).__name__ for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    print("FqnToConfig on one block:", {n: k for n, k in kinds.items() if k != "Parameter"})
    assert isinstance(block.attn.to_q.weight, SVDQuantTensor)


if __name__ == "__main__":
    main()
