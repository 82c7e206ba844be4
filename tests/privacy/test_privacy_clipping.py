"""Clipped sums, clipping bounds, noise scale and micro-batching through the optimizer."""

from __future__ import annotations

import pytest
import torch
from privacy_helpers import (
    Regressor,
    flat_norm,
    loop_grads,
    regression_batch,
    row_loader,
    text_batch,
)
from torch import nn

from fedtrust.privacy import PrivacyEngine
from fedtrust.privacy.clipping import clip_factors, per_sample_norms
from fedtrust.privacy.clipping import per_sample_gradients as materialise
from fedtrust.privacy.grad_sample import PerSampleHooks


def make(model, batch, batch_size, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    kw.setdefault("noise_multiplier", 0.0)
    kw.setdefault("poisson_sampling", False)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=row_loader(batch, batch_size), **kw
    )
    return engine, model, opt, loader


def loop_clipped_sum(model, batch, c, mode="flat"):
    ref = loop_grads(model, batch)
    total = {n: torch.zeros_like(g) for n, g in ref[0].items()}
    norms = []
    for r in ref:
        norm = flat_norm(r)
        norms.append(norm)
        factor = min(1.0, c / float(norm)) if mode == "flat" else c / (float(norm) + 0.01)
        for n, g in r.items():
            total[n] += factor * g
    return total, torch.stack(norms)


@pytest.mark.parametrize("mode", ["flat", "automatic"])
def test_clipped_sum_equals_loop(bert, mode):
    batch = text_batch(6, 7, pad_rows=2)
    _, norms = loop_clipped_sum(bert, batch, 1.0)
    mid = norms.sort().values
    c = float(mid[2] + mid[3]) / 2  # three samples clipped, three not
    expected, _ = loop_clipped_sum(bert, batch, c, mode)
    _, model, opt, loader = make(bert, batch, 6, max_grad_norm=c, clipping=mode)
    (b,) = list(loader)
    model(**b).loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad * 6, expected[n], atol=1e-10, rtol=1e-7, msg=n)


@pytest.mark.parametrize("mode", ["flat", "automatic"])
def test_every_clipped_gradient_within_norm(gpt2, mode):
    ids = text_batch(5, 8, vocab=100, labels=None, pad_rows=0)["input_ids"]
    hooks = PerSampleHooks(gpt2)
    gpt2(input_ids=ids, labels=ids).loss.backward()
    usages = hooks.take()[0]
    hooks.detach()
    norms = per_sample_norms(usages) * 5
    c = float(norms.min()) / 2  # all clipped
    coef = clip_factors(norms, c, mode) * 5
    sq = sum(g.flatten(1).pow(2).sum(1) for g in materialise(usages).values())
    clipped = coef * sq.sqrt()
    assert (clipped <= c * (1 + 1e-9)).all()
    if mode == "flat":
        torch.testing.assert_close(clipped, torch.full_like(clipped, c))


def test_microbatches_give_same_sum_as_one_batch(bert):
    batch = text_batch(7, 6, pad_rows=3)
    grads = []
    for phys in (None, 2, 3):
        model = type(bert)(bert.config).double()
        model.load_state_dict(bert.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model, opt, loader = PrivacyEngine().make_private(
            module=model,
            optimizer=opt,
            data_loader=row_loader(batch, 7),
            noise_multiplier=0.0,
            max_grad_norm=0.5,
            poisson_sampling=False,
            max_physical_batch_size=phys,
        )
        seen = 0
        for b in loader:
            assert b["input_ids"].shape[0] <= (phys or 7)
            seen += 1
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad()
        assert seen == (1 if phys is None else -(-7 // phys))
        # exactly one SGD step: params moved by -lr * final averaged gradient
        grads.append({n: (before[n] - p.detach()) / 0.1 for n, p in model.named_parameters()})
    for other in grads[1:]:
        for n, g in grads[0].items():
            torch.testing.assert_close(other[n], g, atol=1e-10, rtol=1e-7, msg=n)


class ZeroLoss(nn.Module):
    """Loss with zero gradient: p.grad after a DP step is pure noise / expected batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(200, 100)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        return type("Out", (), {"loss": (self.lin(x) * 0.0).sum()})()


@pytest.mark.parametrize("phys", [None, 3])
def test_noise_std_is_sigma_times_c_once_per_logical_batch(phys):
    sigma, c, n = 1.3, 0.7, 12
    model = ZeroLoss()
    batch = {"x": torch.randn(n, 200), "y": torch.zeros(n)}
    gen = torch.Generator().manual_seed(1)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=row_loader(batch, n),
        noise_multiplier=sigma,
        max_grad_norm=c,
        poisson_sampling=False,
        max_physical_batch_size=phys,
        noise_generator=gen,
    )
    draws = []
    for _ in range(4):
        for b in loader:
            model(**b).loss.backward()
            opt.step()
            if opt.param_groups[0]["params"][0].grad is not None:
                draws.append(model.lin.weight.grad.flatten() * n)
            opt.zero_grad()
    assert len(draws) == 4  # one noisy step per logical batch, not per micro-batch
    noise = torch.cat(draws)
    assert abs(float(noise.std()) / (sigma * c) - 1) < 0.02
    assert abs(float(noise.mean())) < 0.02 * sigma * c
    assert engine.steps == 4


def test_mean_reduction_matches_sum_reduction():
    batch = regression_batch(8)
    out = []
    for reduction, scale in (("mean", 8.0), ("sum", 1.0)):
        model = Regressor().double()
        if reduction == "sum":
            model.forward = lambda x, y, m=model: type(
                "O",
                (),
                {  # type: ignore[method-assign]
                    "loss": (m.lin(x) - y).pow(2).sum()
                },
            )()
        _, model, opt, loader = make(model, batch, 8, max_grad_norm=1.0, loss_reduction=reduction)
        (b,) = list(loader)
        model(**b).loss.backward()
        opt.step()
        out.append(model.lin.weight.grad * scale)
    torch.testing.assert_close(out[0], out[1])
