"""Learning-rate schedules."""
import pytest

from pipeline.optim.schedule import cosine


def test_cosine_decays_to_zero_and_stays_there():
    rate = cosine(0.1, 100)
    assert rate(0) == pytest.approx(0.1)
    assert rate(50) == pytest.approx(0.05)
    assert rate(100) == pytest.approx(0.0)
    assert rate(150) == pytest.approx(0.0)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="got 0.1 and 0"):
        cosine(0.1, 0)
