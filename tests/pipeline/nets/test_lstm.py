"""The coordinate-wise LSTM cell equals torch.nn.LSTMCell; preprocessing refuses a bad p."""
from __future__ import annotations

import pytest
import torch

from pipeline.nets import init, lstm


def test_cell_equals_torch_lstm_cell_with_the_biases_summed():
    reference = torch.nn.LSTMCell(3, 5, dtype=torch.float64)
    x, h, c = (torch.randn(7, n, dtype=torch.float64) for n in (3, 5, 5))
    expected_h, expected_c = reference(x, (h, c))
    ours = lstm.cell(x, h, c, reference.weight_ih, reference.weight_hh, reference.bias_ih + reference.bias_hh)
    torch.testing.assert_close(ours, (expected_h, expected_c))


def test_init_cell_draws_in_torch_nn_lstm_range_and_order():
    w_ih, w_hh, bias = lstm.init_cell(2, 4, init.generator(0), torch.float64)
    assert (w_ih.shape, w_hh.shape, bias.shape) == ((16, 2), (16, 4), (16,))
    assert max(w.abs().max().item() for w in (w_ih, w_hh, bias)) <= 0.5
    gen = init.generator(0)
    assert torch.equal(w_ih, init.uniform((16, 2), 0.5, gen, torch.float64))


def test_preprocess_refuses_a_non_positive_p():
    with pytest.raises(ValueError, match="got 0"):
        lstm.preprocess(torch.ones(3), p=0)
