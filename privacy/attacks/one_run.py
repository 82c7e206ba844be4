"""One-run privacy auditing (Steinke, Nasr & Jagielski, NeurIPS 2023, "Privacy auditing with one
(1) training run").

m canaries are each included in the training run independently with probability 1/2. After the
ONE run, an attacker scores every canary, guesses IN for the k+ highest scores and OUT for the
k- lowest, and abstains on the rest. If the mechanism is (ε, δ)-DP with respect to every canary,
the number W of correct guesses among r = k+ + k- guesses obeys (their theorem for ε-DP, and
their (ε, δ) theorem as computed by the p-value algorithm of their appendix, with f(v) =
P[Binomial(r, e^ε/(1+e^ε)) ≥ v]):

    P[W ≥ v] ≤ f(v) + 2 m δ · max_{i=1..v} (f(v - i) - f(v)) / i.

A run with v correct guesses whose right-hand side is below 1 - confidence therefore refutes
(ε, δ)-DP; `epsilon_lower_bound` returns the largest such ε (bisection). The audit is sound for
ANY scoring of the canaries, so the guess counts may be chosen after seeing the scores as long
as the grid they come from is fixed beforehand and paid for (Bonferroni: `audit_from_scores`).

Two ways to plant canaries:

- white-box gradient canaries for DP-SGD (`GradientCanaries`): Dirac gradients of norm exactly
  C = max_grad_norm on m distinct coordinates of the audited parameters, added to the clipped
  gradient sum before the noise and Poisson-sampled with the real examples' rate q, so the
  accountant's analysis of a real example applies to each canary word for word. The attacker
  sees every noisy gradient (every iterate) but not which steps sampled a canary.
  `audit_gaussian_mechanism` simulates the same release on the canary coordinates alone (no
  model): fast, and the best a white-box Dirac-canary attacker can do against DP-SGD.
- input-space (black-box) canaries: `split_canaries` draws the inclusion bits; train on the IN
  rows; score every canary by its negative loss (`fedtrust.privacy.attacks.scores.
  example_scores(...)["loss"]`, negated: members have low loss) and call `audit_from_scores`
  (or `audit_from_losses`).

How tight: at δ = 1e-5 the 2mδ term caps what any attacker can show. Even against a mechanism
with no privacy at all, perfect guesses on all m = 10^3 (10^4, 10^5) canaries give ε ≈ 5.3
(6.6, 6.4) after the default 5-way Bonferroni split, and at most ≈ 8.2 over all m without any
split: a claimed ε = 8 at δ = 1e-5 can hardly be refuted by this bound. White-box Dirac
canaries against correctly calibrated DP-SGD reach about 0.3-0.45 of the claimed ε (0.46 at
q = 1, ε = 4, m = 10^4, rdp accounting).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from scipy import stats

from ..optimizer import DPOptimizer

Score = Literal["llr", "sum"]
SeedLike = np.random.Generator | int | None

DEFAULT_SPLITS = (1.0, 0.5)
_EPS_CAP = 100.0
_SIGMA_FLOOR = 1e-3


# -- the bound ------------------------------------------------------------------------------------
def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float = 0.0) -> float:
    """Upper bound on P[≥ `correct` of `guesses` guesses right] for an (ε, δ)-DP mechanism.

    Steinke et al. 2023 (δ = 0: W is dominated by Binomial(r, e^ε/(1+e^ε))) and their δ > 0
    bound, as their appendix computes it: f(v) + 2mδ · max_{1≤i≤v} (f(v-i) - f(v)) / i with
    f(v) = P[Binomial(r, e^ε/(1+e^ε)) ≥ v].
    """
    _check_counts(m, guesses, correct)
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    if correct == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    beta = float(stats.binom.sf(correct - 1, guesses, p))  # f(v) = P[Bin(r, p) >= v]
    if delta > 0:
        # (f(v-i) - f(v)) = P[v-i <= Bin < v] for i = 1..v: cumulative pmf from v-1 downwards
        pmf = stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, p)
        alpha = float(np.max(np.cumsum(pmf) / np.arange(1, correct + 1)))
        beta += 2.0 * m * delta * alpha
    return min(beta, 1.0)


def epsilon_lower_bound(
    m: int, guesses: int, correct: int, delta: float = 0.0, confidence: float = 0.95
) -> float:
    """Largest ε refuted at `confidence` by `correct` right of `guesses` guesses on m canaries.

    That is, an (ε, δ)-DP mechanism would produce ≥ `correct` right guesses with probability
    below 1 - `confidence` (`p_value`). Bisection on ε; the returned ε always satisfies
    p_value < 1 - confidence itself (a valid refutation, hence of every smaller ε too), and is
    0 when even ε = 0 is not refuted (no evidence).
    """
    _check_counts(m, guesses, correct)
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    level = 1.0 - confidence
    if guesses == 0 or p_value(m, guesses, correct, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, guesses, correct, hi, delta) < level:
        lo, hi = hi, 2 * hi
        if hi > _EPS_CAP:
            return lo
    for _ in range(50):
        mid = (lo + hi) / 2
        if p_value(m, guesses, correct, mid, delta) < level:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-6:
            break
    return lo


def _check_counts(m: int, guesses: int, correct: int) -> None:
    if not 0 <= correct <= guesses <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= m, got {correct}, {guesses}, {m}")


# -- guessing from scores -------------------------------------------------------------------------
@dataclass(frozen=True)
class OneRunAudit:
    """Result of a one-run audit: ε lower bound (at `confidence`, for the stated δ)."""

    m: int  # canaries
    guesses: int  # r = k_plus + k_minus of the reported guess
    correct: int  # right guesses among them
    epsilon_lower_bound: float  # the mechanism is not (ε, δ)-DP for any ε below this
    confidence: float  # overall, after the Bonferroni split over `grid_size` guess counts
    delta: float
    k_plus: int  # guessed IN: the k_plus highest scores
    k_minus: int  # guessed OUT: the k_minus lowest scores
    grid_size: int = 1  # guesses tried (each tested at confidence 1 - (1-conf)/grid_size)

    def report(self, claimed_epsilon: float, canaries: str) -> dict[str, Any]:
        """The audit next to the ε it checks, as a run's summary states it."""
        return {
            "method": f"one-run audit (Steinke, Nasr & Jagielski 2023), {canaries}",
            "claimed_epsilon": claimed_epsilon,
            "audited_epsilon_lower_bound": self.epsilon_lower_bound,
            "delta": self.delta,
            "confidence": self.confidence,
            "canaries": self.m,
            "guesses": self.guesses,
            "correct": self.correct,
            "passed": self.epsilon_lower_bound <= claimed_epsilon,
        }


def default_guess_counts(m: int) -> list[int]:
    """Total guess counts tried by default: m, m/3, m/9, m/27, m/81 (rounded up, distinct)."""
    return sorted({math.ceil(m / 3**k) for k in range(5)})


def audit_from_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[int] | None = None,
    splits: Sequence[float] | None = None,
    center: float | None = None,
) -> OneRunAudit:
    """Best ε lower bound over a fixed grid of guesses, Bonferroni-corrected.

    Higher score = more likely IN. For every total r in `guess_counts` (default
    `default_guess_counts(m)`) the attacker makes r guesses in each of these ways:

    - for every fraction s in `splits`: IN on the round(s·r) highest and OUT on the
      r - round(s·r) lowest scores;
    - if `center` is given (a score the attacker deems equally likely IN and OUT, e.g. 0 for a
      log-likelihood ratio): the r scores farthest from `center`, IN above it and OUT below.

    `splits` defaults to (1.0, 0.5), or to none when `center` is given. Every one of the G
    guesses of the grid is tested at level (1 - confidence)/G, so the best of them is still a
    valid lower bound at `confidence` (the guesses depend on the scores only, never on the
    inclusion bits). Ties are broken by canary index (independent of the inclusion bits).
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    inc = np.asarray(included).reshape(-1).astype(bool)
    m = len(s)
    if len(inc) != m or m == 0:
        raise ValueError(f"need as many inclusion bits as scores (> 0), got {len(inc)} and {m}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    counts = default_guess_counts(m) if guess_counts is None else [int(r) for r in guess_counts]
    if not counts or any(not 1 <= r <= m for r in counts):
        raise ValueError(f"guess counts must be in [1, m={m}], got {counts}")
    if splits is None:
        splits = DEFAULT_SPLITS if center is None else ()
    if any(not 0 <= f <= 1 for f in splits):
        raise ValueError(f"splits must be fractions in [0, 1], got {list(splits)}")
    if not splits and center is None:
        raise ValueError("give at least one split or a center")
    grid = sorted({(round(f * r), r - round(f * r)) for r in counts for f in splits})
    order = np.argsort(-s, kind="stable")  # highest first
    hit_top = np.concatenate([[0], np.cumsum(inc[order])])  # IN among the k highest
    hit_bottom = np.concatenate([[0], np.cumsum(~inc[order[::-1]])])  # OUT among k lowest
    if center is not None:
        grid += [(-r, 0) for r in sorted(set(counts))]  # marker: r farthest from the center
        far = np.argsort(-np.abs(s - center), kind="stable")
        above = s[far] > center
        right = np.where(above, inc[far], ~inc[far])
        hit_far = np.concatenate([[0], np.cumsum(right)])
        ins_far = np.concatenate([[0], np.cumsum(above)])
    per_guess = 1.0 - (1.0 - confidence) / len(grid)
    best: OneRunAudit | None = None
    for a, b in grid:
        if a < 0:  # around the center
            r = -a
            v, k_plus = int(hit_far[r]), int(ins_far[r])
            k_minus = r - k_plus
        else:
            k_plus, k_minus, r = a, b, a + b
            v = int(hit_top[k_plus] + hit_bottom[k_minus])
        eps = epsilon_lower_bound(m, r, v, delta, per_guess)
        if best is None or eps > best.epsilon_lower_bound:
            best = OneRunAudit(m, r, v, eps, confidence, delta, k_plus, k_minus, len(grid))
    assert best is not None
    return best


# -- input-space (black-box) canaries -------------------------------------------------------------
def split_canaries(m: int, rng: SeedLike = None) -> np.ndarray:
    """m secret inclusion bits, each True (train on the canary) with probability 1/2."""
    if m < 1:
        raise ValueError(f"need at least one canary, got {m}")
    return np.random.default_rng(rng).random(m) < 0.5


def audit_from_losses(
    losses: np.ndarray,
    included: np.ndarray,
    delta: float,
    confidence: float = 0.95,
    guess_counts: Sequence[int] | None = None,
) -> OneRunAudit:
    """`audit_from_scores` on -loss (e.g. `example_scores(model, task, canary_rows)["loss"]`)."""
    return audit_from_scores(
        -np.asarray(losses, dtype=np.float64), included, delta, confidence, guess_counts
    )


# -- white-box gradient canaries for DP-SGD -------------------------------------------------------
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
        self._llr += _step_llr(y, sigma, self.sample_rate)

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
            center=_center(score, self.steps, self.sample_rate),
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


def _center(score: Score, steps: int, q: float) -> float:
    if score == "llr":
        return 0.0
    if score == "sum":
        return steps * q / 2
    raise ValueError(f"score must be 'llr' or 'sum', got {score!r}")


def _step_llr(y: np.ndarray, sigma: float, q: float) -> np.ndarray:
    """log-likelihood ratio of one step: y ~ (1-q)N(0,σ²) + qN(1,σ²) against N(0,σ²).

    σ is floored at 1e-3 (σ = 0: no noise, or noise replayed away), where the ratio is still
    finite and 0 remains the point where IN and OUT are equally likely.
    """
    z = (y - 0.5) / max(sigma, _SIGMA_FLOOR) ** 2
    if q >= 1:
        return z
    return np.logaddexp(math.log1p(-q), math.log(q) + z)


def audit_gaussian_mechanism(
    m: int,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    rng: SeedLike = None,
    confidence: float = 0.95,
    guess_counts: Sequence[int] | None = None,
    score: Score = "llr",
) -> OneRunAudit:
    """Audit DP-SGD's release on the canary coordinates alone, with no model.

    Exactly what `GradientCanaries` sees when no real example touches the canary coordinates:
    per step and canary, y = b + N(0, σ²) in units of C, b ~ Bernoulli(q) for an IN canary and
    0 for an OUT one. Fast (m x steps normal draws); pass a σ below the claimed one to play a
    broken mechanism.
    """
    if steps < 1 or not 0 < sample_rate <= 1 or noise_multiplier < 0:
        raise ValueError(
            f"need steps >= 1, sample rate in (0, 1], noise >= 0; got {steps}, {sample_rate}, "
            f"{noise_multiplier}"
        )
    center = _center(score, steps, sample_rate)
    gen = np.random.default_rng(rng)
    included = split_canaries(m, gen)
    total = np.zeros(m)
    for _ in range(steps):
        y = (included & (gen.random(m) < sample_rate)) + noise_multiplier * gen.standard_normal(m)
        total += y if score == "sum" else _step_llr(y, noise_multiplier, sample_rate)
    return audit_from_scores(total, included, delta, confidence, guess_counts, center=center)
