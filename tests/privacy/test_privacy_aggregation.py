"""Server-side user-level DP utilities: clip an update to C, add N(0, (σC)²), noisy mean."""

from __future__ import annotations

import pytest
import torch

from fedtrust.privacy import (
    InvalidPrivacyParameterError,
    add_gaussian_noise,
    clip_and_noise,
    clip_update,
    noisy_mean,
    update_norm,
)


def update(scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 4, generator=g) * scale, "b": torch.randn(5, generator=g) * scale}


def test_clip_update_scales_down_only_when_needed():
    big = update(10.0)
    clipped, norm = clip_update(big, 1.0)
    assert norm == pytest.approx(update_norm(big)) and norm > 1.0
    assert update_norm(clipped) == pytest.approx(1.0)
    torch.testing.assert_close(clipped["a"] / clipped["a"].norm(), big["a"] / big["a"].norm())
    small = update(0.01)
    same, _ = clip_update(small, 1.0)
    torch.testing.assert_close(same["b"], small["b"])
    as_list, _ = clip_update(list(big.values()), 1.0)
    torch.testing.assert_close(as_list[0], clipped["a"])
    with pytest.raises(InvalidPrivacyParameterError):
        clip_update(big, 0.0)


def test_noise_std_and_clip_and_noise():
    zeros = {"w": torch.zeros(200_000)}
    noisy = add_gaussian_noise(zeros, 0.3, torch.Generator().manual_seed(1))
    assert float(noisy["w"].std()) == pytest.approx(0.3, rel=0.01)
    assert zeros["w"].abs().sum() == 0  # input untouched
    out = clip_and_noise(update(10.0), 2.0, 0.0)
    assert update_norm(out) == pytest.approx(2.0)
    out = clip_and_noise({"w": torch.zeros(100_000)}, 2.0, 1.5, torch.Generator().manual_seed(2))
    assert float(out["w"].std()) == pytest.approx(3.0, rel=0.02)


def test_noisy_mean():
    ups = [clip_update(update(s), 1.0)[0] for s in (0.1, 5.0, 20.0)]
    exact = noisy_mean(ups, noise_multiplier=0.0, max_norm=1.0)
    torch.testing.assert_close(exact["a"], sum(u["a"] for u in ups) / 3)
    wide = [{"w": torch.zeros(50_000)}] * 4
    noisy = noisy_mean(wide, 2.0, 0.5, denominator=10, generator=torch.Generator().manual_seed(0))
    assert float(noisy["w"].std()) == pytest.approx(2.0 * 0.5 / 10, rel=0.02)
