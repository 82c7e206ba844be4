"""User-level differential privacy on the server (DP-FedAvg): the mechanism and its accountant.

One round, with C the clipping norm, σ the noise multiplier and k = selection.devices_per_round:

1. sample devices by Poisson sampling: device i independently with probability p_i
   (uniform selection: p_i = k/N for every registered device; activity selection:
   p_i = min(q_max, max(f·k/N, (k/N)·w_i / w_ref)) for a device with data, 0 without, with
   w_ref the weight of the public reference count privacy.activity_reference and f the
   selection's fairness floor (0 = none), recomputed every round from the device's own
   current data);
2. clip each reply's update Δ_i = reply_i − global to L2 norm C;
3. release  mean = (Σ_i clip(Δ_i) + N(0, σ²C²·I)) / k.

k is the expected number of sampled devices, public and fixed: a round where fewer devices reply
than were sampled (dropouts, failures, sampled devices without data), or where nobody is
sampled, still releases the full noise σC on the sum divided by k. Adding or removing one device
moves the released mean by at most C/k. Only `mean` reaches the server optimizer (FedAvg:
global + mean; FedAdam: mean is the pseudo-gradient), so the optimizer, its moments included, is
post-processing of the released means.

Accounting: the Poisson-subsampled Gaussian mechanism, one step per round (rounds that sample
nobody included), neighbouring populations differing by adding or removing one device, at the
public sample rate q: k/N under uniform selection, q_max under activity selection. q never
depends on the data, so a neighbouring population with one huge device cannot raise ε.

Activity selection: a device's probability is a function of its own data and public constants
only (never normalised over the population), so adding or removing one device leaves the
others' probabilities unchanged, and the cap bounds its own. The population size N in k/N is
the checked-in population at the start of the run, treated as public.

Fairness floor and annealing: the floor lifts light devices to f·k/N, a public constant, so a
device's probability still depends on its own data only, and f·k/N <= k/N <= q_max, so the cap,
hence the accountant's rate q_max, is unchanged. An annealed beta (`Selection.at_round`) makes
p_i change with the public round number only; q_max still caps every round's p_i.

Randomness (device sampling and noise) comes from the OS entropy pool unless
privacy.reproducible_noise is set, which seeds it from run.seed: no privacy then against anybody
who knows the seed.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from fedtrust.errors import ConfigError
from fedtrust.privacy.accounting import calibrate_noise, compute_epsilon, resolve_delta
from fedtrust.privacy.attacks.one_run import CanaryDevices

from .selection import Selection, capped_inclusion, poisson_draw

log = logging.getLogger(__name__)

RELATION = "add/remove one device"
SAMPLING_STREAM, NOISE_STREAM = 0, 1


def dp_generator(
    seed: int, server_round: int, stream: int, reproducible: bool
) -> np.random.Generator:
    """A fresh generator from OS entropy; from (seed, round, stream) only when reproducible."""
    if reproducible:
        return np.random.default_rng([seed, server_round, stream])
    return np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def clipped_noisy_mean(
    global_arrays: Mapping[str, np.ndarray],
    replies: Sequence[Mapping[str, np.ndarray]],
    clip: float,
    noise_multiplier: float,
    denominator: float,
    rng: np.random.Generator,
    plant: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> dict[str, np.ndarray]:
    """(Σ_i clip_C(reply_i − global) + N(0, (σC)²·I)) / denominator, in float64.

    The noise is on the sum and the denominator is fixed, however many replies there are.
    `plant` may add to the clipped sum before the noise (the one-run audit's canary devices).
    """
    total = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in global_arrays.items()}
    for reply in replies:
        sq = 0.0
        for key, g in global_arrays.items():
            d = np.asarray(reply[key], dtype=np.float64) - g
            sq += float(np.vdot(d, d))
        factor = min(1.0, clip / (sq**0.5 + 1e-12))
        for key, g in global_arrays.items():
            total[key] += factor * (np.asarray(reply[key], dtype=np.float64) - g)
    if plant is not None:
        plant(total)
    std = noise_multiplier * clip
    for value in total.values():
        if std > 0:
            value += rng.normal(0.0, std, size=value.shape)
        value /= denominator
    return total


class DPFedAvg:
    """Sampling, clipped noisy mean and ε of user-level DP; build with `create`."""

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip: float,
        devices_per_round: int,
        num_devices: int,
        max_inclusion: float,
        capped: bool,
        reference: float = 0.0,
        delta: float,
        accountant: str,
        seed: int,
        reproducible: bool,
        audit_canaries: int = 0,
    ) -> None:
        self.noise_multiplier, self.clip = noise_multiplier, clip
        self.k, self.num_devices = devices_per_round, num_devices
        self.max_inclusion, self.capped, self.reference = max_inclusion, capped, reference
        # uniform selection: every device has exactly k/N, which is then the rate to account
        self.sample_rate = max_inclusion if capped else devices_per_round / num_devices
        self.delta, self.accountant = delta, accountant
        self.seed, self.reproducible = seed, reproducible
        self.audit_canaries = audit_canaries  # > 0: the one-run audit plants this many canaries
        self.canaries: CanaryDevices | None = None
        self._canary_state: dict[str, np.ndarray] | None = None

    @classmethod
    def create(
        cls,
        *,
        num_devices: int,
        devices_per_round: int,
        clip: float,
        rounds: int,
        noise_multiplier: float = 0.0,
        target_epsilon: float = 0.0,
        target_delta: float = 0.0,
        max_inclusion: float = 0.0,
        activity_reference: float = 0.0,
        activity: bool = False,
        accountant: str = "pld",
        seed: int = 0,
        reproducible: bool = False,
        audit_canaries: int = 0,
    ) -> DPFedAvg:
        """Check the settings (one-line ConfigErrors) and calibrate σ to `target_epsilon` over
        `rounds` rounds (else use `noise_multiplier`). `max_inclusion` 0 = min(1, 2k/N);
        `target_delta` 0 = default_delta(N); `activity`: activity-based selection, capped."""
        k = devices_per_round
        if num_devices < 1 or k > num_devices:
            raise ConfigError(
                f"selection.devices_per_round = {k} is larger than the population "
                f"({num_devices} devices): user-level DP samples each device with probability "
                "devices_per_round / devices, which must be <= 1"
            )
        q_max = max_inclusion or min(1.0, 2 * k / num_devices)
        if not k / num_devices <= q_max <= 1:
            raise ConfigError(
                f"privacy.max_inclusion = {max_inclusion} must be in [devices_per_round / "
                f"devices, 1] = [{k / num_devices:.4g}, 1] (0 = min(1, 2k/N))"
            )
        if activity and not activity_reference > 0:
            raise ConfigError(
                "privacy.activity_reference: user-level DP with activity selection needs a "
                "public reference example count (a device holding that many is sampled at "
                "k/N); probabilities normalised over the population would depend on every "
                "device's data"
            )
        delta = resolve_delta(target_delta, num_devices)
        if not 0 < delta < 1 / num_devices:
            raise ConfigError(
                f"privacy.target_delta = {delta} must be below 1/N = {1 / num_devices:.4g} "
                f"for N = {num_devices} devices (user-level DP protects devices)"
            )
        mech = cls(
            noise_multiplier=noise_multiplier,
            clip=clip,
            devices_per_round=k,
            num_devices=num_devices,
            max_inclusion=q_max,
            capped=activity,
            reference=activity_reference,
            delta=delta,
            accountant=accountant,
            seed=seed,
            reproducible=reproducible,
            audit_canaries=audit_canaries,
        )
        if target_epsilon > 0:
            mech.noise_multiplier = float(
                calibrate_noise(target_epsilon, delta, mech.sample_rate, rounds, accountant)
            )
        return mech

    def inclusion(self, selection: Selection, counts: np.ndarray) -> np.ndarray:
        """Each device's inclusion probability this round (never above `sample_rate`); give it
        this round's selection (`selection.at_round`), whose `floor` lifts light devices."""
        if not self.capped:
            return np.full(self.num_devices, self.sample_rate)
        weights = selection.weights(np.asarray(counts, float))
        reference = float(selection.weights(np.array([self.reference]))[0])
        base_rate = self.k / self.num_devices
        return capped_inclusion(weights, reference, base_rate, self.sample_rate, selection.floor)

    def sample(self, selection: Selection, counts: np.ndarray, server_round: int) -> np.ndarray:
        """This round's Poisson sample of devices (sorted ids; may be empty)."""
        rng = dp_generator(self.seed, server_round, SAMPLING_STREAM, self.reproducible)
        return poisson_draw(self.inclusion(selection, counts), rng)

    def release(
        self,
        global_arrays: Mapping[str, np.ndarray],
        replies: Sequence[Mapping[str, np.ndarray]],
        server_round: int,
    ) -> dict[str, np.ndarray]:
        """The round's noisy mean update (float64), whatever the number of replies."""
        rng = dp_generator(self.seed, server_round, NOISE_STREAM, self.reproducible)
        canaries = self._canaries(global_arrays)
        mean = clipped_noisy_mean(
            global_arrays,
            replies,
            self.clip,
            self.noise_multiplier,
            self.k,
            rng,
            canaries.plant if canaries is not None else None,
        )
        if canaries is not None:
            canaries.observe(mean, self.k, self.noise_multiplier)
        return mean

    def _canaries(self, global_arrays: Mapping[str, np.ndarray]) -> CanaryDevices | None:
        """The audit's canary devices, made on the first round (they need the model's shapes)."""
        if self.audit_canaries and self.canaries is None:
            shapes = {k: np.shape(v) for k, v in global_arrays.items()}
            self.canaries = CanaryDevices(shapes, self.audit_canaries, self.clip, self.sample_rate)
            if self._canary_state is not None:
                self.canaries.load_state_dict(self._canary_state)
        return self.canaries

    def state(self) -> dict[str, dict[str, np.ndarray]]:
        """What a checkpoint keeps of the mechanism: the audit's canaries, if any."""
        return {"canaries": self.canaries.state_dict()} if self.canaries is not None else {}

    def load_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        self._canary_state = state.get("canaries")

    def one_run_audit(self, rounds: int) -> dict[str, Any] | None:
        """Claimed ε against the one-run audit's lower bound, when canaries were planted."""
        if self.canaries is None or self.canaries.steps == 0:
            return None
        claimed = float(self.epsilon(rounds)["epsilon"])
        return self.canaries.audit(self.delta).report(claimed, "white-box canary devices")

    def epsilon(self, rounds: int) -> dict[str, float | str]:
        """ε after `rounds` rounds, with what it means."""
        history = [(self.noise_multiplier, self.sample_rate, rounds)]
        return {
            "epsilon": compute_epsilon(history, self.delta, self.accountant),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "relation": RELATION,
            "accountant": self.accountant,
        }
