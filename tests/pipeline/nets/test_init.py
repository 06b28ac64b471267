"""Seeded initializers: the same generator state gives the same bits in any dtype."""
from __future__ import annotations

import pytest
import torch

from pipeline.nets import init

DRAWS = {
    "uniform": lambda gen, dtype: init.uniform((3, 4), 0.5, gen, dtype),
    "uniform_between": lambda gen, dtype: init.uniform_between((3, 4), 4.0, 6.0, gen, dtype),
    "xavier_uniform": lambda gen, dtype: init.xavier_uniform((3, 4), 4, 3, gen, dtype),
    "kaiming_normal": lambda gen, dtype: init.kaiming_normal((3, 4), 4, gen, dtype),
    "normal": lambda gen, dtype: init.normal((3, 4), 2.0, gen, dtype),
}


@pytest.mark.parametrize("name", sorted(DRAWS))
def test_same_seed_same_bits_and_float32_is_the_rounded_float64(name):
    draw = DRAWS[name]
    first = draw(init.generator(5), torch.float64)
    assert torch.equal(first, draw(init.generator(5), torch.float64))
    assert torch.equal(draw(init.generator(5), torch.float32), first.to(torch.float32))
    assert not torch.equal(first, draw(init.generator(6), torch.float64))


def test_bounds():
    gen = init.generator(0)
    assert init.uniform((1000,), 0.5, gen, torch.float64).abs().max() <= 0.5
    between = init.uniform_between((1000,), 4.0, 6.0, gen, torch.float64)
    assert 4.0 <= between.min() and between.max() <= 6.0


def test_a_generator_passes_through():
    gen = torch.Generator().manual_seed(1)
    assert init.generator(gen) is gen
