"""pytest configuration: logging, the report header (seed of the GPU tests), fixtures. Builders of random inputs
and tiny models live in builders.py."""

from __future__ import annotations

import logging
import os
import time

import pytest
import torch
import torch._inductor.config as inductor_config

from .builders import MLP, report_header

logging.getLogger("svdquant_ops").setLevel(logging.INFO)
INDUCTOR_CONFIG = inductor_config.save_config()  # as the session began


@pytest.fixture(autouse=True)
def inductor_config_restored():
    """Every test ends with Inductor's config as the session began. torchao's quantize_ sets it process-wide by
    default (set_inductor_config=True: coordinate-descent tuning and more), as a user's call does; leaked into later
    tests, it made each compile autotune its kernels, slowly and to other kernels (on a GPU on 2026-12-07: a
    bit-equality test of two compiles failed and the next compile outran the call)."""
    yield
    inductor_config.load_config(INDUCTOR_CONFIG)


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return MLP().to(torch.bfloat16).eval()


def pytest_report_header(config):
    return report_header()


def pytest_runtest_setup(item):
    """SVDQ_TEST_DEADLINE (epoch seconds; benchmarks/gpu_run.sh sets it from TESTS_S): tests that would start after it
    are skipped with that reason, so a device call whose time runs out still ends with pytest's counts of what ran
    and what did not, instead of being killed mid-run with no summary."""
    deadline = os.environ.get("SVDQ_TEST_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip("SVDQ_TEST_DEADLINE passed: not run in this call")


def pytest_runtest_logreport(report):
    """SVDQ_TEST_REPORT_AT_ONCE=1 (benchmarks/gpu_run.sh sets it): a failure's traceback is printed when it happens,
    not only in pytest's summary at the end, which a device call stopped at its limit never reaches."""
    if report.failed and os.environ.get("SVDQ_TEST_REPORT_AT_ONCE") == "1":
        print(f"\nFAILED {report.nodeid} ({report.when}, {report.duration:.1f} s)\n{report.longreprtext}\n", flush=True)
