"""Byzantine-robust aggregation: Flower's own robust strategies under fedtrust's selection.

A device that lies (sends a scaled or sign-flipped update) drags FedAvg's mean as far as it
likes; these aggregations bound what a minority of such devices can do:
- `fedmedian`: the coordinate-wise median of the replies (Yin et al. 2018);
- `fedtrimmedavg`: the coordinate-wise mean after cutting the `beta` share at each end;
- `krum` / `multikrum`: the reply (or the mean of the m replies) closest to its n - f - 2
  nearest neighbours, for f assumed malicious devices (Blanchard et al. 2017);
- `bulyan`: Multi-Krum selection, then a trimmed mean around the median (El Mhamdi et al. 2018).
Norm bounding (`DeviceSampling(max_update_norm=...)`) works with every aggregation, FedAvg too.
Like FedAvg here, each returns the weights in the global model's own dtypes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from .strategy import DeviceSampling


class _GlobalDtypes(DeviceSampling):
    """Cast the aggregate back to the global model's dtypes (a median of float32 may not be)."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None:
            return arrays, metrics
        dtypes = {k: v.numpy().dtype for k, v in self._global.items()}
        cast = {k: Array(np.asarray(v.numpy(), dtype=dtypes[k])) for k, v in arrays.items()}
        return ArrayRecord(cast), metrics


class SampledFedMedian(_GlobalDtypes, FedMedian):
    """Flower's FedMedian (coordinate-wise median) with fedtrust's selection."""


class SampledFedTrimmedAvg(_GlobalDtypes, FedTrimmedAvg):
    """Flower's FedTrimmedAvg (coordinate-wise trimmed mean, `beta` cut at each end)."""


class SampledKrum(_GlobalDtypes, Krum):
    """Flower's Krum (`num_malicious_nodes` = f) with fedtrust's selection."""


class SampledMultiKrum(_GlobalDtypes, MultiKrum):
    """Flower's Multi-Krum: the mean of the `num_nodes_to_select` best-scored replies."""


class SampledBulyan(_GlobalDtypes, Bulyan):
    """Flower's Bulyan (`num_malicious_nodes` = f) with fedtrust's selection."""


ROBUST = {
    "fedmedian": SampledFedMedian,
    "fedtrimmedavg": SampledFedTrimmedAvg,
    "krum": SampledKrum,
    "multikrum": SampledMultiKrum,
    "bulyan": SampledBulyan,
}
