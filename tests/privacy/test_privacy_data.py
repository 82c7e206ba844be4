"""Poisson sampling, empty batches (noise-only steps), fixed-size batches, batch splitting."""

from __future__ import annotations

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from privacy_helpers import Regressor, regression_batch, row_loader, text_batch, tiny_bert
from torch.utils.data import DataLoader

from fedtrust.privacy import DPDataLoader, PrivacyEngine
from fedtrust.privacy.data import batch_size_of, split_batch


def test_poisson_batches_vary_include_empty_and_training_works():
    model = tiny_bert()
    data = text_batch(20, 6, pad_rows=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=row_loader(data, 2),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(3),
    )
    assert engine.sample_rate == 0.1 and engine.expected_batch_size == 2.0
    sizes = []
    for _ in range(6):
        for batch in loader:
            sizes.append(batch["input_ids"].shape[0])
            loss = model(**batch).loss
            assert torch.isfinite(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    empty = engine.steps - len(sizes)
    assert engine.steps == 60  # every logical batch is a step, empty ones included
    assert empty > 0 and 0 not in sizes  # the loop never sees an empty batch
    assert len(set(sizes)) >= 3
    assert any((p.detach() != before[n]).any() for n, p in model.named_parameters())


def test_empty_batch_takes_noise_only_step():
    model = Regressor().double()
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=row_loader(regression_batch(10), 5),
        noise_multiplier=2.0,
        max_grad_norm=1.0,
        noise_generator=torch.Generator().manual_seed(0),
    )
    w = model.lin.weight.detach().clone()
    opt.begin_logical_batch()
    opt.noise_only_step()
    assert engine.steps == 1 and opt.last_batch_samples == 0
    change = (model.lin.weight.detach() - w) * engine.expected_batch_size
    assert 0.5 < float(change.std()) / 2.0 < 1.5  # pure N(0, (σC)²) / expected batch size


def test_fixed_size_batches_option():
    model = Regressor().double()
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=row_loader(regression_batch(10), 4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )
    sizes = [b["x"].shape[0] for b in loader]
    assert sizes == [4, 4, 2]
    assert engine.sample_rate == 0.4 and engine.expected_batch_size == 4.0


def test_batch_helpers():
    batch = {"a": torch.arange(10).view(5, 2), "b": [torch.zeros(5), torch.ones(3)], "c": "x"}
    assert batch_size_of(batch) == 5
    assert batch_size_of([]) == 0 and batch_size_of({"a": torch.zeros(0, 3)}) == 0
    parts = split_batch(batch, 2)
    assert [batch_size_of(p) for p in parts] == [2, 2, 1]
    torch.testing.assert_close(torch.cat([p["a"] for p in parts]), batch["a"])
    assert parts[0]["b"][1].shape == (3,) and parts[2]["c"] == "x"  # non-batch items kept


def test_the_dp_loader_is_a_torch_data_loader():
    data = row_loader(regression_batch(10), 5)
    loaders = {}
    for poisson in (True, False):
        model = Regressor().double()
        _, _, loaders[poisson] = PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=data,
            noise_multiplier=1.0,
            poisson_sampling=poisson,
        )
    for loader in loaders.values():
        assert isinstance(loader, DataLoader) and isinstance(loader, DPDataLoader)
        assert loader.dataset is data.dataset and len(loader) == len(data) == 2
        assert loader.collate_fn is not None and loader.num_workers == 0
    poisson, fixed = loaders[True], loaders[False]
    # Poisson batches vary in size: a batch sampler and no batch_size, as in torch and Opacus
    assert isinstance(poisson.batch_sampler, UniformWithReplacementSampler)
    assert poisson.batch_size is None and poisson.sample_rate == 0.5
    assert fixed.batch_sampler is data.batch_sampler and fixed.sample_rate == 0.5
    torch.testing.assert_close([b["x"] for b in fixed], [b["x"] for b in data])
