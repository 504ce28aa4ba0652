"""The suite's own isolation (conftest.py): what a test leaks into process-wide state must not reach the next test.
The two tests run in file order; the first leaks as torchao's quantize_ does, the second must not see it."""

from __future__ import annotations

import torch._inductor.config as inductor_config


def test_a_test_may_change_inductors_config():
    # what torchao's quantize_(..., Int8WeightOnlyConfig()) does by default (set_inductor_config=True)
    inductor_config.coordinate_descent_tuning = True
    inductor_config.coordinate_descent_check_all_directions = True


def test_the_next_test_starts_from_the_sessions_config():
    assert inductor_config.coordinate_descent_tuning is False
    assert inductor_config.coordinate_descent_check_all_directions is False
