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

from .bound import (
    OneRunAudit,
    Score,
    audit_from_losses,
    audit_from_scores,
    audit_gaussian_mechanism,
    default_guess_counts,
    epsilon_lower_bound,
    p_value,
    split_canaries,
)
from .canaries import CanaryDevices, GradientCanaries

__all__ = [
    "CanaryDevices",
    "GradientCanaries",
    "OneRunAudit",
    "Score",
    "audit_from_losses",
    "audit_from_scores",
    "audit_gaussian_mechanism",
    "default_guess_counts",
    "epsilon_lower_bound",
    "p_value",
    "split_canaries",
]
