"""Learning-rate schedules."""
import pytest

from pipeline.optim.schedule import cosine, linear


def test_cosine_decays_to_zero_and_stays_there():
    rate = cosine(0.1, 100)
    assert rate(0) == pytest.approx(0.1)
    assert rate(50) == pytest.approx(0.05)
    assert rate(100) == pytest.approx(0.0)
    assert rate(150) == pytest.approx(0.0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="got 0.1 and 0"):
        cosine(0.1, 0)


def test_linear_moves_from_lr_to_final_as_openai_reptile():
    rate = linear(1.0, 0.0, 4)
    assert [rate(i) for i in range(6)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0, 0.0])
    assert linear(0.5, 0.1, 2)(1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="got 1.0, -0.1 and 4"):
        linear(1.0, -0.1, 4)
