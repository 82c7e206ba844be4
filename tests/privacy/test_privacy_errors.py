"""Bad input raises a clear, one-line error of a fedtrust.privacy exception class."""

from __future__ import annotations

import pytest
import torch
from privacy_helpers import Regressor, regression_batch, row_loader, tiny_bert
from torch import nn

from fedtrust import errors
from fedtrust.privacy import (
    BudgetTooSmallError,
    InvalidPrivacyParameterError,
    PrivacyBudgetExhausted,
    PrivacyEngine,
    PrivacyError,
    UnsupportedModuleError,
)


def attach(model=None, n=20, batch=4, **kw):
    model = model if model is not None else Regressor()
    data = row_loader({"x": torch.randn(n, 6), "y": torch.randn(n, 4)}, batch)
    return PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=data,
        **kw,
    )


def test_privacy_errors_are_fedtrust_errors():
    """The CLI prints a `FedtrustError` as one line: every privacy error is one."""
    assert PrivacyError is errors.PrivacyError
    for cls in (
        InvalidPrivacyParameterError,
        BudgetTooSmallError,
        UnsupportedModuleError,
        PrivacyBudgetExhausted,
    ):
        assert issubclass(cls, errors.FedtrustError)
    assert issubclass(InvalidPrivacyParameterError, ValueError)  # `except ValueError` still works


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    assert isinstance(exc.value, PrivacyError)
    return msg


@pytest.mark.parametrize("eps", [0.0, -1.0])
def test_epsilon_must_be_positive(eps):
    with pytest.raises(InvalidPrivacyParameterError) as exc:
        attach(target_epsilon=eps, target_delta=1e-3, epochs=1)
    assert "target_epsilon must be > 0" in one_line(exc)


@pytest.mark.parametrize("delta", [0.0, -1e-5, 0.05, 1.0])  # N = 20: δ must be < 0.05
def test_delta_must_be_in_open_interval_below_one_over_n(delta):
    with pytest.raises(InvalidPrivacyParameterError) as exc:
        attach(target_epsilon=1.0, target_delta=delta, epochs=1)
    assert "1/N" in one_line(exc) and "N=20" in str(exc.value)


@pytest.mark.parametrize(
    "kw,text",
    [
        ({}, "give noise_multiplier"),
        ({"target_epsilon": 1.0, "epochs": 1}, "target_delta is required"),
        ({"target_epsilon": 1.0, "target_delta": 1e-3}, "needs epochs or steps"),
        ({"noise_multiplier": -1.0}, "noise_multiplier must be >= 0"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        ({"noise_multiplier": 1.0, "clipping": "quantile"}, "clipping must be one of"),
        ({"noise_multiplier": 1.0, "loss_reduction": "none"}, "loss_reduction"),
    ],
)
def test_missing_or_bad_arguments(kw, text):
    with pytest.raises(InvalidPrivacyParameterError) as exc:
        attach(**kw)
    assert text in one_line(exc)


def test_budget_too_small_for_one_step():
    with pytest.raises(BudgetTooSmallError) as exc:
        # no noise multiplier below 1e6 gets to epsilon 1e-6 at delta 1e-12 (at delta 1e-3 the
        # exact PLD accountant finds one: epsilon = 0 once delta exceeds the total variation)
        attach(target_epsilon=1e-6, target_delta=1e-12, epochs=1)
    assert "too small" in one_line(exc)
    with pytest.raises(BudgetTooSmallError) as exc:
        attach(noise_multiplier=0.3, target_epsilon=0.05, target_delta=1e-3)
    assert "one step" in one_line(exc)


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x, y):
        return type("O", (), {"loss": (self.head(self.block(x)) - y).pow(2).mean()})()


def test_batchnorm_named_with_fix():
    with pytest.raises(UnsupportedModuleError) as exc:
        attach(WithBatchNorm(), noise_multiplier=1.0)
    msg = one_line(exc)
    assert "'block.1'" in msg and "BatchNorm1d" in msg and "GroupNorm" in msg
    assert exc.value.path == "block.1" and exc.value.module_class == "BatchNorm1d"
    model = WithBatchNorm()
    model.block[1].requires_grad_(False)  # frozen is fine for the hook check
    with pytest.raises(UnsupportedModuleError):
        attach(model, noise_multiplier=1.0)  # still mixes samples in train mode


class OwnParamAndChildren(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(4))
        self.lin = nn.Linear(6, 4)

    def forward(self, x, y):
        return type("O", (), {"loss": (self.lin(x) * self.gain - y).pow(2).mean()})()


def test_parameter_outside_leaf_module_and_rnn():
    with pytest.raises(UnsupportedModuleError) as exc:
        attach(OwnParamAndChildren(), noise_multiplier=1.0)
    assert "<root>" in one_line(exc) and "freeze" in str(exc.value)
    with pytest.raises(UnsupportedModuleError) as exc:
        attach(nn.LSTM(6, 4), noise_multiplier=1.0)
    assert "LSTM" in one_line(exc) and "DPLSTM" in str(exc.value)


def test_functorch_failure_names_module():
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(6))

        def forward(self, x):
            return x * self.w if float(x.sum()) > -1e9 else x  # .item() under vmap fails

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.odd = DataDependent()
            self.lin = nn.Linear(6, 4)

        def forward(self, x, y):
            return type("O", (), {"loss": (self.lin(self.odd(x)) - y).pow(2).mean()})()

    model, opt, loader = attach(M(), noise_multiplier=1.0)
    batch = next(iter(loader))
    model(**batch).loss.backward()
    with pytest.raises(UnsupportedModuleError) as exc:
        opt.step()
    assert "'odd'" in str(exc.value) and "DataDependent" in str(exc.value)


def test_attach_twice_and_gradient_checkpointing():
    model = Regressor()
    attach(model, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="already attached"):
        attach(model, noise_multiplier=1.0)
    bert = tiny_bert()
    getattr(bert, "activation_checkpointing_enable", bert.gradient_checkpointing_enable)()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        attach(bert, noise_multiplier=1.0)


def test_dataset_size_enters_delta_check():
    data = regression_batch(200)
    model = Regressor().double()
    PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=row_loader(data, 10),
        target_epsilon=2.0,
        target_delta=4e-3,
        epochs=1,
    )  # 4e-3 < 1/200 is fine


def test_module_output_without_batch_dimension_is_refused():
    class SharedBias(nn.Module):  # adds a (T, d) table to every sample: no batch dimension
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Embedding(3, 4)
            self.lin = nn.Linear(6, 4)

        def forward(self, x, y):
            h = self.lin(x).unsqueeze(1) + self.pos(torch.arange(3))
            return type("O", (), {"loss": (h.mean(1) - y).pow(2).mean()})()

    model, opt, loader = attach(SharedBias(), noise_multiplier=1.0, poisson_sampling=False)
    model(**next(iter(loader))).loss.backward()
    with pytest.raises(UnsupportedModuleError) as exc:
        opt.step()
    assert "'pos'" in one_line(exc) and "batch-first" in str(exc.value)
