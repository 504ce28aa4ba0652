"""Save a quantized pipeline with diffusers' save_pretrained, load it back in a fresh process with
DiffusionPipeline.from_pretrained (after `import svdquant_ops`), check that the loaded transformer computes
bit-identical outputs on the inputs this process recorded, and generate an image there.

    python integrations/load_saved.py [--model black-forest-labs/FLUX.1-dev] [--dir quantized-pipeline]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from _common import arguments, generate, load

import svdquant_ops
from svdquant_ops.integrations.pipelines import Recorder

# The fresh process: argv = directory, device, this folder, pipeline-call arguments (JSON), then script options.
LOADER = """
import json, sys, torch
import svdquant_ops  # registers SVDQuantConfig / SVDQuantTensor for diffusers' loader
from diffusers import DiffusionPipeline
directory, device = sys.argv[1], sys.argv[2]
pipe = DiffusionPipeline.from_pretrained(directory, torch_dtype=torch.bfloat16).to(device)
args, kwargs, ref = torch.load(directory + "/probe.pt")
dev = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v
with torch.inference_mode():
    out = pipe.transformer(*[dev(a) for a in args], **{k: dev(v) for k, v in kwargs.items()})[0].cpu()
print(f"fresh process: transformer output on the recorded input bit-identical: {torch.equal(out, ref)}")
sys.path.insert(0, sys.argv[3])
from _common import arguments, generate
options = arguments("").parse_args(sys.argv[5:])
generate(pipe, options, json.loads(sys.argv[4]))[0].save(directory + "/image.png")
print(f"fresh process: wrote {directory}/image.png")
sys.exit(0 if torch.equal(out, ref) else 1)
"""


def main() -> None:
    p = arguments(__doc__)
    p.add_argument("--dir", default="quantized-pipeline")
    args = p.parse_args()
    pipe, call = load(args)
    print(svdquant_ops.quantize_model(pipe.transformer, precision=args.precision))
    pipe.save_pretrained(args.dir)
    recorder = Recorder()  # the transformer's inputs and output at each step, on the CPU
    handle = pipe.transformer.register_forward_hook(recorder, with_kwargs=True)
    generate(pipe, args, call, output_type="latent")
    handle.remove()
    torch.save(recorder.calls[-1], Path(args.dir) / "probe.pt")
    forwarded = ["--steps", str(args.steps), "--prompt", args.prompt, "--device", args.device]
    r = subprocess.run([sys.executable, "-c", LOADER, args.dir, args.device, str(Path(__file__).parent),
                        json.dumps(call), *forwarded])
    sys.exit(r.returncode)


if __name__ == "__main__":
    main()
