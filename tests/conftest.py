"""Shared builders: tiny models with random weights (no downloads) and error metrics."""

from __future__ import annotations

import logging

import pytest
import torch

logging.getLogger("svdquant_ops").setLevel(logging.INFO)


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


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().to(torch.bfloat16).eval()
