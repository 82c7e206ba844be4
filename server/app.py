"""The Flower ServerApp: runs fedtrust's round loop with the parts its caller builds.

The caller (an experiment runner, or the `flwr run .` entry point in `fedtrust.simulations`)
says how to build a `Federation` from the Flower context, and what to do with the result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from .evaluation import CentralEvaluator
from .federation import FederationResult, RoundCallback, run_federation
from .strategy import DeviceSampling


@dataclass
class Federation:
    """Everything one federated run needs on the server side."""

    strategy: DeviceSampling
    evaluator: CentralEvaluator
    run_dir: Path  # where the checkpoint lives
    rounds: int
    num_devices: int
    device_config: ConfigRecord  # sent to every device with every message
    callbacks: Sequence[RoundCallback] = field(default_factory=tuple)
    round_timeout: float = 3600.0  # seconds a round waits for its replies (0 = no limit)
    retries: int = 1  # fresh selections of a round with too few usable replies


def make_server_app(
    build: Callable[[Context], Federation],
    on_result: Callable[[Federation, FederationResult], None],
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        federation = build(context)
        result = run_federation(
            grid,
            federation.strategy,
            federation.evaluator,
            federation.run_dir,
            rounds=federation.rounds,
            num_devices=federation.num_devices,
            device_config=federation.device_config,
            callbacks=federation.callbacks,
            timeout=federation.round_timeout,
            retries=federation.retries,
        )
        on_result(federation, result)

    return app
