"""End to end: the three-line adoption on transformers models, and engine behaviour."""

from __future__ import annotations

import gc

import pytest
import torch
from privacy_helpers import (
    Regressor,
    flat_norm,
    loop_grads,
    regression_batch,
    row_loader,
    text_batch,
    tiny_bert,
    tiny_gpt2,
)

from fedtrust.privacy import PrivacyBudgetExhausted, PrivacyEngine


def test_three_line_adoption_bert_poisson_microbatches_scheduler():
    model = tiny_bert()
    for m in model.modules():  # dropout on: the hooks see the activations actually used
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    names = [n for n, _ in model.named_parameters()]
    data = row_loader(text_batch(40, 8, pad_rows=10), 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    engine = PrivacyEngine(accountant="rdp")
    model2, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data,
        target_epsilon=4.0,
        target_delta=1e-3,
        epochs=2,
        max_grad_norm=1.0,
        max_physical_batch_size=3,
    )
    assert model2 is model and [n for n, _ in model.named_parameters()] == names
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    eps = []
    model.train()
    for _ in range(2):
        for batch in loader:
            loss = model(**batch).loss
            loss.backward()
            assert all(p.grad is None for p in model.parameters())  # no non-private grads
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
        eps.append(engine.get_epsilon())
    assert engine.steps == 10 and 0 < eps[0] < eps[1] <= 4.0
    assert optimizer.param_groups[0]["lr"] < 1e-3  # the scheduler drove the wrapped optimizer
    with torch.no_grad():
        model(**next(iter(loader)))
    assert optimizer.hooks.pending == []  # evaluation under no_grad records nothing


def test_gpt2_training_keeps_tied_weights():
    model = tiny_gpt2()
    ids = text_batch(24, 10, vocab=100, labels=None, pad_rows=0)["input_ids"]
    data = row_loader({"input_ids": ids, "labels": ids}, 6)
    w0 = model.transformer.wte.weight.detach().clone()
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=data,
        noise_multiplier=0.8,
        max_grad_norm=1.0,
    )
    for batch in loader:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not torch.equal(model.transformer.wte.weight.detach(), w0)


def test_dp_training_learns_with_small_noise():
    data = regression_batch(64)
    target = torch.randn(6, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    data["y"] = data["x"] @ target
    model = Regressor().double()
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=row_loader(data, 16),
        noise_multiplier=0.1,
        max_grad_norm=5.0,
        noise_generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        start = float(model(**data).loss)
    for _ in range(30):
        for batch in loader:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        end = float(model(**data).loss)
    assert end < 0.2 * start


def test_manual_accumulation_of_two_forwards_clips_each_sample():
    data = regression_batch(6)
    model = Regressor().double()
    ref = loop_grads(model, data)
    c = float(torch.stack([flat_norm(r) for r in ref]).median())
    expected = sum(min(1.0, c / float(flat_norm(r))) * r["lin.weight"] for r in ref)
    engine = PrivacyEngine()
    model, opt, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=row_loader(data, 6),
        noise_multiplier=0.0,
        max_grad_norm=c,
        poisson_sampling=False,
    )
    losses = [
        model(**{k: v[p] for k, v in data.items()}).loss  # batches of 2 and 4
        for p in (slice(0, 2), slice(2, 6))
    ]
    opt.zero_grad()  # between forward and backward: must not drop the recorded forwards
    sum(losses).backward()
    opt.step()
    torch.testing.assert_close(model.lin.weight.grad * 6, expected)


def test_detach_restores_plain_training_and_budget_flag():
    model = Regressor().double()
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=row_loader(regression_batch(20), 10),
        noise_multiplier=1.0,
        target_epsilon=5.0,
        target_delta=1e-3,
    )
    assert not engine.budget_exhausted
    engine.detach()
    model(**regression_batch(4)).loss.backward()
    assert model.lin.weight.grad is not None  # ordinary autograd again


def test_exhaustion_lets_caller_checkpoint_and_stop():
    model = Regressor().double()
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=row_loader(regression_batch(20), 5),
        noise_multiplier=1.5,
        target_epsilon=3.0,
        target_delta=1e-3,
    )
    saved = None
    steps = 0
    try:
        while True:
            for batch in loader:
                if engine.budget_exhausted:  # cooperative stop...
                    raise StopIteration
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad()
                steps += 1
    except StopIteration:
        saved = {k: v.clone() for k, v in model.state_dict().items()}
    assert saved is not None and 0 < engine.get_epsilon() <= 3.0 and steps > 1
    batch = regression_batch(5)
    model(**batch).loss.backward()
    with pytest.raises(PrivacyBudgetExhausted):  # ...or the exception from step()
        opt.step()


def test_records_released_while_user_still_holds_loss():
    """The graph kept alive by `loss` must not keep activations/gradients after step()."""
    model = Regressor().double()
    engine = PrivacyEngine()
    model, opt, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=row_loader(regression_batch(8), 8),
        noise_multiplier=1.0,
        poisson_sampling=False,
    )
    batch = regression_batch(8)
    x = batch.pop("x") * 1.0  # our own tensor, so only the engine could keep its storage
    ptr = x.data_ptr()
    loss = model(x=x, **batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    del x
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.data_ptr() == ptr]
    assert loss.grad_fn is not None and alive == []
