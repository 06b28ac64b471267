import numpy as np
import pytest
import torch

from pipeline.runtime.flat_buffer import Layout


def test_roundtrip_and_order_independence():
    params = {"b": torch.arange(3.0), "a.weight": torch.arange(6.0).view(2, 3)}
    layout = Layout.of(params)
    flat = layout.flatten(params)
    assert flat.dtype == torch.float32 and flat.shape == (9,)
    back = layout.unflatten(flat.numpy())
    assert back.keys() == params.keys()
    for k in params:
        assert torch.equal(back[k], params[k])
    assert layout.names == ("a.weight", "b")


def test_mismatch_is_named():
    layout = Layout.of({"w": torch.zeros(2)})
    with pytest.raises(KeyError, match="v"):
        layout.flatten({"v": torch.zeros(2)})
    with pytest.raises(ValueError, match="3 values, layout needs 2"):
        layout.unflatten(np.zeros(3, dtype=np.float32))
