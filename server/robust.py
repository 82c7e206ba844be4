"""Byzantine-robust aggregation: Flower's own robust strategies under fedtrust's selection.

A device that lies (sends a scaled or sign-flipped update) drags FedAvg's mean as far as it
likes; these aggregations bound what a minority of such devices can do:
- `fedmedian`: the coordinate-wise median of the replies (Yin et al. 2018);
- `fedtrimmedavg`: the coordinate-wise mean after cutting the `beta` share at each end;
- `krum` / `multikrum`: the reply (or the mean of the m replies) closest to its n - f - 2
  nearest neighbours, for f assumed malicious devices (Blanchard et al. 2017);
- `bulyan`: Multi-Krum selection, then a trimmed mean around the median (El Mhamdi et al. 2018).
Norm bounding (`DeviceSampling(max_update_norm=...)`) works with every aggregation, FedAvg too.
Each works on the updates in float64 and returns the weights in the global model's dtypes; a
round with fewer usable replies than its rule needs is retried like any round with too few.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum

from .replies import TooFewReplies
from .strategy import DeviceSampling


class _InUpdateSpace(DeviceSampling):
    """Flower's robust rule applied to the updates (reply - global model) in float64, the
    result added back to the global model in its own dtypes.

    Krum's distances ||a - b||^2 computed as ||a||^2 + ||b||^2 - 2 a.b on whole float32 weight
    vectors lose the (small) distances between updates to cancellation: on a 2M-parameter model
    the rounding error is far larger than the distance a x10 attacker adds. Medians and trimmed
    means are the same on updates (they commute with the shift), only more precise.
    """

    def min_usable(self) -> int:
        """The fewest replies the rule is defined for (Krum: 2f + 3, Bulyan: 4f + 3)."""
        return 1

    def _flower_aggregate(
        self, server_round: int, ok: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if len(ok) < self.min_usable():
            raise TooFewReplies(server_round, len(ok), self.min_usable(), self.last_failures)
        glob = {k: v.numpy() for k, v in self._global.items()}
        key = self.arrayrecord_key
        for msg in ok:
            weights = msg.content[key]
            msg.content[key] = ArrayRecord(
                {k: Array(weights[k].numpy().astype(np.float64) - g) for k, g in glob.items()}
            )
        update, metrics = super()._flower_aggregate(server_round, ok)
        if update is None:
            return None, metrics
        out = {k: Array(np.asarray(g + update[k].numpy(), dtype=g.dtype)) for k, g in glob.items()}
        return ArrayRecord(out), metrics


class SampledFedMedian(_InUpdateSpace, FedMedian):
    """Flower's FedMedian (coordinate-wise median) with fedtrust's selection."""


class SampledFedTrimmedAvg(_InUpdateSpace, FedTrimmedAvg):
    """Flower's FedTrimmedAvg (coordinate-wise trimmed mean, `beta` cut at each end)."""


class SampledKrum(_InUpdateSpace, Krum):
    """Flower's Krum (`num_malicious_nodes` = f) with fedtrust's selection."""

    def min_usable(self) -> int:
        return 2 * self.num_malicious_nodes + 3


class SampledMultiKrum(_InUpdateSpace, MultiKrum):
    """Flower's Multi-Krum: the mean of the n - f best-scored of the round's n usable replies."""

    def min_usable(self) -> int:
        return 2 * self.num_malicious_nodes + 3

    def _flower_aggregate(
        self, server_round: int, ok: list[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.num_nodes_to_select = max(1, len(ok) - self.num_malicious_nodes)
        return super()._flower_aggregate(server_round, ok)


class SampledBulyan(_InUpdateSpace, Bulyan):
    """Flower's Bulyan (`num_malicious_nodes` = f) with fedtrust's selection."""

    def min_usable(self) -> int:
        return 4 * self.num_malicious_nodes + 3


ROBUST = {
    "fedmedian": SampledFedMedian,
    "fedtrimmedavg": SampledFedTrimmedAvg,
    "krum": SampledKrum,
    "multikrum": SampledMultiKrum,
    "bulyan": SampledBulyan,
}
