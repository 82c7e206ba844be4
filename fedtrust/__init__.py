"""fedtrust: federated NLU training with differential privacy, privacy attacks and fairness audits.

The package is built in one-way layers (an import never goes up; `make lint` checks it):

- libraries: `fedtrust.tasks` (data, tokenizer, model, loss, metrics), `fedtrust.privacy` (the
  eDP-SGD engine, accounting, attack algorithms), `fedtrust.compression` (update codecs and
  learned diffs, shared by devices and server), `fedtrust.fairness` (fairness metrics and
  methods). Explicit, typed arguments; no experiment config.
- federation: `fedtrust.clients` (the Flower ClientApp, device data, local training) and
  `fedtrust.server` (the Flower ServerApp, strategies, selection, evaluation, checkpoints). They
  use the libraries and talk to each other only through Flower messages.
- experiments: `fedtrust.simulations` (config, CLI, runners, run folders, reports).

`fedtrust.errors` holds the one exception tree every layer raises from.
"""

__version__ = "0.1.0"
