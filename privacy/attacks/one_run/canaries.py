"""The one-run audit's canaries: white-box Dirac gradients in DP-SGD (`GradientCanaries`) and
Dirac canary devices in user-level DP-FedAvg (`CanaryDevices`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ...optimizer import DPOptimizer
from .bound import OneRunAudit, Score, SeedLike, audit_from_scores, guess_center, step_llr


class _Canaries:
    """Secret inclusion bits, per-step evidence and the audit: what every canary kind shares."""

    m: int
    sample_rate: float
    steps: int
    times_sampled: np.ndarray
    _included: np.ndarray
    _sum: np.ndarray
    _llr: np.ndarray

    def _start(self, m: int, sample_rate: float, rng: np.random.Generator) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.m, self.sample_rate, self._rng = int(m), float(sample_rate), rng
        self._included = rng.random(self.m) < 0.5
        self.steps = 0
        self.times_sampled = np.zeros(self.m, dtype=np.int64)  # secret: the attacker's unknown
        self._sum = np.zeros(self.m)
        self._llr = np.zeros(self.m)

    @property
    def included(self) -> np.ndarray:
        """The secret inclusion bits (read them only to grade the attacker's guesses)."""
        return self._included.copy()

    def _draw(self) -> np.ndarray:
        """This step's sampled canaries: IN ones, each with the real examples' rate q."""
        sampled = self._included & (self._rng.random(self.m) < self.sample_rate)
        self.times_sampled += sampled
        return sampled

    def _accumulate(self, y: np.ndarray, sigma: float) -> None:
        self.steps += 1
        self._sum += y
        self._llr += step_llr(y, sigma, self.sample_rate)

    # -- results ----------------------------------------------------------------------------------
    def scores(self, kind: Score = "llr") -> np.ndarray:
        """Per-canary evidence of inclusion over all observed steps (higher: more likely IN)."""
        if kind == "llr":
            return self._llr.copy()
        if kind == "sum":
            return self._sum.copy()
        raise ValueError(f"score must be 'llr' or 'sum', got {kind!r}")

    def audit(
        self,
        delta: float,
        confidence: float = 0.95,
        guess_counts: Sequence[int] | None = None,
        score: Score = "llr",
    ) -> OneRunAudit:
        """The one-run audit of the observed run: `audit_from_scores` on `scores(score)`.

        Guesses are the canaries farthest from the score at which IN and OUT are equally
        likely (0 for "llr", steps·q/2 for "sum").
        """
        if self.steps == 0:
            raise RuntimeError("no step was observed; attach the canaries and train first")
        return audit_from_scores(
            self.scores(score),
            self._included,
            delta,
            confidence,
            guess_counts,
            center=guess_center(score, self.steps, self.sample_rate),
        )


class GradientCanaries(_Canaries):
    """m Dirac gradient canaries in DP-SGD, observed through every noisy gradient.

    Canary j is the gradient C·e_{c_j} (norm exactly C = `max_grad_norm`, so within the clipping
    bound like any real sample's clipped gradient) at a distinct random coordinate c_j of the
    flattened `params`. Each canary is IN with probability 1/2 (secret bits drawn from
    `generator`); at every logical step every IN canary joins the batch independently with the
    real examples' sample rate q and is added to the clipped sum before the noise
    (`DPOptimizer.clipped_sum_hook`), so DP-SGD's accounting covers it exactly as a real example.

    The observer (a post-step hook on the wrapped optimizer) reads the noisy gradient at each
    canary coordinate, times the denominator, in units of C: y_t = b_t + (real data) + N(0, σ²)
    with b_t = 1 when the canary was sampled at step t. Scores, summed over ALL steps (the
    attacker does not know when a canary was sampled): ``"llr"``, Σ_t log(1 - q + q·e^{(y_t -
    1/2)/σ²}), the Neyman-Pearson statistic of the subsampled Gaussian mechanism (ignoring the
    real data's share), or ``"sum"``, Σ_t y_t (the same ranking when q = 1).

    Usage::

        canaries = GradientCanaries(list(model.parameters()), m=1000, max_grad_norm=C,
                                    sample_rate=engine.sample_rate, generator=secret_seed)
        canaries.attach(dp_optimizer)
        ...  # train
        result = canaries.audit(delta=target_delta)
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        m: int,
        max_grad_norm: float,
        sample_rate: float,
        generator: SeedLike | torch.Generator = None,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameter to plant canaries in")
        if len({id(p) for p in self.params}) != len(self.params):
            raise ValueError("a parameter is listed twice")
        sizes = np.array([p.numel() for p in self.params])
        if not 1 <= m <= sizes.sum():
            raise ValueError(f"need 1 <= m <= {sizes.sum()} (audited coordinates), got {m}")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.max_grad_norm = float(max_grad_norm)
        if isinstance(generator, torch.Generator):
            generator = int(torch.randint(0, 2**62, (1,), generator=generator))
        rng = np.random.default_rng(generator)
        coords = rng.choice(int(sizes.sum()), size=int(m), replace=False)
        self._start(m, sample_rate, rng)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        owner = np.searchsorted(offsets, coords, side="right") - 1
        # per parameter: (parameter, canary ids, flat offsets inside it)
        self._slots: list[tuple[torch.nn.Parameter, np.ndarray, torch.Tensor]] = []
        for k, p in enumerate(self.params):
            ids = np.flatnonzero(owner == k)
            if len(ids):
                local = torch.as_tensor(coords[ids] - offsets[k], device=p.device)
                self._slots.append((p, ids, local))
        self.coordinates = coords
        self._optimizer: DPOptimizer | None = None
        self._previous_hook: Any = None
        self._handle: Any = None
        self._replay: torch.Generator | None = None
        self._pending = False

    # -- hooks ------------------------------------------------------------------------------------
    def attach(self, optimizer: DPOptimizer, noise_replay: torch.Generator | None = None) -> None:
        """Plant the canaries in `optimizer`'s clipped sums and observe its noisy gradients.

        `noise_replay`: a generator in the same state as the optimizer's own noise generator
        (`optimizer.generator`, which must then drive the noise alone: give the optimizer its
        own generator, since `make_private`'s `noise_generator` also draws the Poisson batches).
        The observer replays the noise draws and subtracts them, as anyone holding the seed
        can: an audit of what a leaked or fixed noise seed does to the guarantee.
        """
        if self._optimizer is not None:
            raise RuntimeError("these canaries are already attached")
        if noise_replay is not None and optimizer.generator is None:
            raise ValueError("nothing to replay: the optimizer draws OS-seeded noise every step")
        params = {id(p) for p in optimizer._params()}
        if any(id(p) not in params for p in self.params):
            raise ValueError("the audited parameters are not all trained by this optimizer")
        self._optimizer = optimizer
        self._replay = noise_replay
        self._previous_hook = optimizer.clipped_sum_hook
        optimizer.clipped_sum_hook = self._plant
        self._handle = optimizer.original_optimizer.register_step_post_hook(self._observe)

    def detach(self) -> None:
        """Stop planting and observing (the scores so far are kept)."""
        if self._optimizer is None:
            return
        self._optimizer.clipped_sum_hook = self._previous_hook
        self._handle.remove()
        self._optimizer = self._handle = self._previous_hook = None

    def _plant(self, params: list[torch.nn.Parameter], sums: dict[int, torch.Tensor]) -> None:
        if self._previous_hook is not None:
            self._previous_hook(params, sums)
        sampled = self._draw()
        for p, ids, local in self._slots:
            hit = sampled[ids]
            if not hit.any():
                continue
            s = sums.get(id(p))
            if s is None:
                s = sums[id(p)] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            elif not s.is_contiguous():
                s = sums[id(p)] = s.contiguous()
            where = local[torch.as_tensor(hit, device=local.device)]
            s.view(-1).index_add_(
                0,
                where,
                torch.full((len(where),), self.max_grad_norm, dtype=s.dtype, device=s.device),
            )
        self._pending = True

    def _observe(self, *_: Any) -> None:
        opt = self._optimizer
        if opt is None or not self._pending:
            return
        self._pending = False
        denom = opt.expected_batch_size if opt.loss_reduction == "mean" else 1.0
        std = opt.noise_multiplier * opt.max_grad_norm
        noise: dict[int, torch.Tensor] = {}
        if self._replay is not None and std > 0:
            for p in opt._params():  # same order, shapes and draws as DPOptimizer._noisy_step
                z = torch.zeros_like(p, memory_format=torch.contiguous_format)
                DPOptimizer._add_noise(z, std, self._replay)
                noise[id(p)] = z
        y = np.zeros(self.m)
        for p, ids, local in self._slots:
            g = p.grad
            if g is None:
                continue
            vals = g.detach().reshape(-1)[local].double() * denom
            if id(p) in noise:
                vals = vals - noise[id(p)].reshape(-1)[local].double()
            y[ids] = vals.cpu().numpy() / self.max_grad_norm
        self._accumulate(y, opt.noise_multiplier if self._replay is None else 0.0)


class CanaryDevices(_Canaries):
    """m Dirac canary devices in user-level DP-FedAvg (`fedtrust.server.user_dp`).

    Canary device j sends the update C·e_{c_j}: norm exactly C, the clipping bound of a real
    device's update, at a distinct random coordinate c_j of the flattened model. Each is IN with
    probability 1/2 (secret bits); every round each IN canary device is Poisson-sampled at the
    accountant's device sampling rate q and, when sampled, added to the round's clipped sum
    before the noise (`plant`). The observer reads the released mean update at the canary
    coordinates (`observe`, the white-box view of every global model), so the accountant's
    analysis of one device applies to each canary device word for word. State (`state_dict`)
    goes into the server's checkpoint, so a resumed run keeps auditing the same canaries.
    """

    def __init__(
        self,
        shapes: dict[str, tuple[int, ...]],
        m: int,
        clip: float,
        sample_rate: float,
        generator: SeedLike = None,
    ) -> None:
        sizes = np.array([int(np.prod(shape)) for shape in shapes.values()])
        if not 1 <= m <= sizes.sum():
            raise ValueError(f"need 1 <= m <= {sizes.sum()} (audited coordinates), got {m}")
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        self.clip, self._shapes = float(clip), dict(shapes)
        rng = np.random.default_rng(generator)
        self._place(rng.choice(int(sizes.sum()), size=int(m), replace=False))
        self._start(m, sample_rate, rng)

    def _place(self, coordinates: np.ndarray) -> None:
        sizes = [int(np.prod(shape)) for shape in self._shapes.values()]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        owner = np.searchsorted(offsets, coordinates, side="right") - 1
        self.coordinates = np.asarray(coordinates)
        self._slots = [
            (key, ids, coordinates[ids] - offsets[k])
            for k, key in enumerate(self._shapes)
            if len(ids := np.flatnonzero(owner == k))
        ]

    def plant(self, sums: dict[str, np.ndarray]) -> None:
        """Add this round's sampled IN canary updates to the clipped sums (before the noise)."""
        sampled = self._draw()
        for key, ids, local in self._slots:
            hit = sampled[ids]
            sums[key].reshape(-1)[local[hit]] += self.clip

    def observe(self, released: dict[str, np.ndarray], denominator: float, sigma: float) -> None:
        """Read the released mean update at the canary coordinates (in units of C)."""
        y = np.zeros(self.m)
        for key, ids, local in self._slots:
            y[ids] = np.asarray(released[key], dtype=np.float64).reshape(-1)[local]
        self._accumulate(y * denominator / self.clip, sigma)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {
            "included": self._included.astype(np.int8),
            "steps": np.array([self.steps]),
            "times_sampled": self.times_sampled,
            "sum": self._sum,
            "llr": self._llr,
            "coordinates": self.coordinates,
        }

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Continue a checkpointed audit: the same canaries, their bits and evidence so far."""
        if len(state["coordinates"]) != self.m:
            raise ValueError(
                f"the checkpoint has {len(state['coordinates'])} canaries, not {self.m}"
            )
        self._place(np.asarray(state["coordinates"]))
        self._included = np.asarray(state["included"]).astype(bool)
        self.steps = int(np.asarray(state["steps"])[0])
        self.times_sampled = np.asarray(state["times_sampled"]).copy()
        self._sum, self._llr = np.array(state["sum"]), np.array(state["llr"])
