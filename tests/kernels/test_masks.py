import numpy as np
import pytest
import torch

from lorakit.kernels.masks import draw_keep_mask, torch_seed


@pytest.mark.parametrize("p", [0.1, 0.05, 0.5, 0.9, 1 / 3])
def test_keep_rate_matches_one_minus_p(p):
    n = 2_000_000
    keep = draw_keep_mask(n, p, seed=123)
    rate = keep.mean()
    # binomial standard deviation; 5 sigma
    assert abs(rate - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n)


def test_threshold_byte_is_refined_not_rounded():
    # p = 0.1 -> 25.6/256: a plain byte threshold would keep 230/256 or 231/256.
    n = 4_000_000
    rate = draw_keep_mask(n, 0.1, seed=7).mean()
    assert abs(rate - 0.9) < 5 * np.sqrt(0.09 / n)
    assert abs(rate - 230 / 256) > 5 * np.sqrt(0.09 / n)


def test_same_seed_same_mask_other_seed_other_mask():
    a, b, c = draw_keep_mask(10_000, 0.2, 5), draw_keep_mask(10_000, 0.2, 5), draw_keep_mask(10_000, 0.2, 6)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_edges_and_errors():
    assert draw_keep_mask(17, 0.0, 1).all()
    assert not draw_keep_mask(17, 1.0, 1).any()
    with pytest.raises(ValueError, match="lora_dropout"):
        draw_keep_mask(3, 1.5, 1)


def test_seed_follows_torch_manual_seed():
    torch.manual_seed(0)
    a = torch_seed()
    torch.manual_seed(0)
    assert torch_seed() == a
    assert torch_seed() != a
