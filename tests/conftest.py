"""pytest configuration: logging, the report header (seed of the GPU tests), fixtures. Builders of random inputs
and tiny models live in builders.py."""

from __future__ import annotations

import logging

import pytest
import torch

from .builders import MLP, report_header

logging.getLogger("svdquant_ops").setLevel(logging.INFO)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().to(torch.bfloat16).eval()


def pytest_report_header(config):
    return report_header()
