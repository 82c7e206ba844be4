"""q-FFL (Li et al. 2020) as Flower's own QFedAvg under fedtrust's device selection."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import QFedAvg

from .strategy import LOSS_KEY, DeviceSampling


class SampledQFedAvg(DeviceSampling, QFedAvg):
    """Flower's q-FedAvg (q-FFL, Li et al. 2020) with fedtrust's selection.

    q-FFL minimises sum_k p_k F_k^(q+1) / (q+1): the larger q, the more a device's update counts
    when its loss F_k is high (q = 0 is FedAvg with equal weights). F_k must be the loss at the
    current global model, which is what devices report as "global_loss" when told to
    (`train_loss_key`); the Lipschitz estimate is L = 1 / client_learning_rate. Flower's q-FedAvg
    weighs each reply by F_k^q and normalises by sum_k h_k: fedtrust's aggregation weights are
    not used, so neither reweighting nor the unbiased weighting applies. L = 1/lr assumes SGD
    local steps (w - w_k = lr * summed gradients); after AdamW steps ||w - w_k||^2 grows with the
    parameter count and h_k's norm term shrinks the server step to almost nothing, so give AdamW
    devices a larger `client_learning_rate` here (the run config's `server.qffl_lr`; the
    fairness sweep uses 1.0).
    """

    def __init__(
        self,
        *,
        client_learning_rate: float,
        q: float = 0.1,
        train_loss_key: str = LOSS_KEY,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("user_dp") is not None:
            raise ValueError("q-FedAvg reads every device's loss: not with user-level DP")
        if kwargs.get("reweighting") is not None or kwargs.get("weighting") == "unbiased":
            raise ValueError("q-FedAvg ignores aggregation weights: no reweighting, no 'unbiased'")
        super().__init__(
            client_learning_rate=client_learning_rate,
            q=q,
            train_loss_key=train_loss_key,
            **kwargs,
        )
