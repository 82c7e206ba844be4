"""Error feedback: nothing is lost, and every coordinate of a steady update is sent."""

from __future__ import annotations

import pytest
import torch

from fedtrust.compression import CompressionSettings, compress_with_feedback, decode

SHAPES = {"w": (10, 6), "b": (6,)}


def _steady_update() -> dict[str, torch.Tensor]:
    """Positive entries spanning a decade, so top-k of the update alone never sends most."""
    gen = torch.Generator().manual_seed(0)
    return {name: 0.1 + 0.9 * torch.rand(shape, generator=gen) for name, shape in SHAPES.items()}


def _rounds(settings, rounds):
    """Run `rounds` rounds with the same update; yield (round, decoded, residual)."""
    update, residual = _steady_update(), None
    for t in range(1, rounds + 1):
        payload, residual = compress_with_feedback(update, residual, settings, seed=t)
        yield t, decode(payload, SHAPES), residual


@pytest.mark.parametrize(
    "settings",
    [
        CompressionSettings(method="topk", density=0.1),
        CompressionSettings(method="topk", density=0.05, bits=4),
        CompressionSettings(method="quantize", bits=2),
    ],
    ids=["topk", "topk-4bit", "quantize-2bit"],
)
def test_what_was_sent_plus_the_residual_is_everything(settings):
    update = _steady_update()
    sent = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    for t, decoded, residual in _rounds(settings, 30):
        for name in SHAPES:
            sent[name] += decoded[name]
            assert torch.allclose(sent[name] + residual[name], t * update[name], atol=1e-4 * t)


def test_with_feedback_every_coordinate_is_sent_and_the_gap_stays_bounded():
    """With k of N entries sent a round, the unsent mass never exceeds (N / k) * |u|_1, so
    (sum sent) / t -> u; every coordinate gets its turn."""
    settings = CompressionSettings(method="topk", density=0.1)
    update = _steady_update()
    entries = sum(t.numel() for t in update.values())
    bound = entries / settings.keep_count(entries) * sum(float(t.sum()) for t in update.values())
    sent = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    for t, decoded, _ in _rounds(settings, 200):
        for name in SHAPES:
            sent[name] += decoded[name]
        gap = max(float((t * update[name] - sent[name]).abs().max()) for name in SHAPES)
        assert gap <= bound
    assert all((sent[name] > 0).all() for name in SHAPES)
    assert all(torch.allclose(sent[n] / 200, update[n], atol=bound / 200) for n in SHAPES)


def test_without_feedback_small_coordinates_are_never_sent():
    settings = CompressionSettings(method="topk", density=0.1, error_feedback=False)
    update = _steady_update()
    sent = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    for _, decoded, residual in _rounds(settings, 50):
        assert residual == {}
        for name in SHAPES:
            sent[name] += decoded[name]
    never = sum(int((sent[name] == 0).sum()) for name in SHAPES)
    entries = sum(t.numel() for t in update.values())
    assert never == entries - settings.keep_count(entries)
    assert max(float((50 * update[n] - sent[n]).abs().max()) for n in SHAPES) >= 50 * 0.1


@pytest.mark.parametrize("method", ["none", "hashed-diff", "sparse-diff"])
def test_methods_without_feedback_return_no_residual(method):
    settings = CompressionSettings(method=method, density=0.2)
    payload, residual = compress_with_feedback(
        _steady_update(), {"w": torch.ones(10, 6)}, settings, 0
    )
    assert residual == {} and payload


def test_a_residual_that_does_not_fit_the_update_is_refused():
    settings = CompressionSettings(method="topk")
    with pytest.raises(ValueError, match="residual tensor 'w'"):
        compress_with_feedback(_steady_update(), {"w": torch.ones(3)}, settings, 0)
