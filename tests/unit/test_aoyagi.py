import pytest

from lightning_devinterp.theory import aoyagi_lambda


@pytest.mark.parametrize(
    ("widths", "rank", "expected"),
    [
        ([5, 3, 5], 0, 6.5),
        ([5, 4, 5], 0, 8.0),
        ([4, 3, 8], 0, 6.0),
        ([2, 2, 2], 1, 2.0),
        ([4, 4, 4, 4], 2, 7.5),
        ([10, 10], 0, 50.0),
        ([10, 10], 3, 50.0),
        ([10, 10], 10, 50.0),
    ],
)
def test_reference_values_from_the_guide(widths, rank, expected):
    assert aoyagi_lambda(widths, rank) == pytest.approx(expected)
