"""starflow.core.checks: the shared input checks and the messages every caller relies on."""

from __future__ import annotations

import numpy as np
import pytest

from starflow.core.checks import check_count, check_float32, check_latent, check_prompt_list, check_text
from starflow.core.errors import StarflowError


@pytest.mark.parametrize(
    ("value", "minimum", "note", "message"),
    [
        (0, 1, "", "n: must be an integer >= 1, got 0"),
        (True, 1, "", "n: must be an integer >= 1, got True"),
        (2.0, 1, "", "n: must be an integer >= 1, got 2.0"),
        ("3", 1, "", "n: must be an integer >= 1, got '3'"),
        (-1, 0, "", "n: must be an integer >= 0, got -1"),
        (1, 2, "diversity needs pairs", "n: must be an integer >= 2 (diversity needs pairs), got 1"),
    ],
)
def test_check_count_refuses_with_the_field_named(value, minimum, note, message):
    with pytest.raises(StarflowError) as caught:
        check_count(value, "n", minimum, note)
    assert str(caught.value) == message


def test_check_count_takes_python_and_numpy_integers():
    for value in (1, 7, np.int64(3), np.uint8(1)):
        check_count(value, "n")
    check_count(0, "n", 0)


def test_check_latent_ranks_and_grid():
    assert check_latent(np.zeros((2, 4, 8, 6)), 4, 2, "x") == (4, 3)
    assert check_latent(np.zeros((1, 3, 4, 8, 8)), 4, 2, "x", (4, 5)) == (4, 4)
    bad = [
        (np.zeros((1, 3, 4, 8, 8)), (4,), r"x: expected a \(B, C, H, W\) latent array, got .* video model\)"),
        (np.zeros((1, 4, 8, 8)), (5,), r"x: expected a \(B, F, C, H, W\) clip array, got \(1, 4, 8, 8\)$"),
        ([1, 2], (4, 5), r"latent array or a \(B, F, C, H, W\) clip array, got list"),
        (np.zeros((1, 3, 8, 8)), (4,), "x: expected 4 latent channels"),
        (np.zeros((0, 4, 8, 8)), (4,), "x: the batch is empty"),
        (np.zeros((1, 4, 8, 7)), (4,), "x: latent size 8x7 is not a positive multiple of patch_size 2"),
    ]
    for x, ranks, message in bad:
        with pytest.raises(StarflowError, match=message):
            check_latent(x, 4, 2, "x", ranks)


def test_check_text_float32_and_prompts():
    check_text(None, 2, 0, None, "y")
    check_text(np.zeros((2, 3, 8)), 2, 8, 3, "y")
    with pytest.raises(StarflowError, match=r"y: expected .* shape \(2, L, 8\) with 1 <= L <= 2, got"):
        check_text(np.zeros((2, 3, 8)), 2, 8, 2, "y")
    with pytest.raises(StarflowError, match="y: this model is not text-conditioned"):
        check_text(np.zeros((2, 3, 8)), 2, 0, None, "y")
    check_float32(np.zeros(2, np.float32), "x")
    with pytest.raises(StarflowError, match="x: expected a float32 numpy array, got float64"):
        check_float32(np.zeros(2), "x")
    with pytest.raises(StarflowError, match="x: expected a float32 numpy array, got list"):
        check_float32([0.0], "x")
    check_prompt_list([""])
    with pytest.raises(StarflowError, match="prompts: pass at least one"):
        check_prompt_list([])
