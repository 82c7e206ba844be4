"""What every `fedtrust` command shares: the console, `--config/--set`, one-line errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from fedtrust.errors import FedtrustError

console = Console(soft_wrap=True)  # one line per message, however long its paths

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override: section.key=value")
]


def fail(message: str) -> NoReturn:
    """Print one error line and exit with status 2 (bad input)."""
    console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(2)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """A `FedtrustError` (bad input) becomes one error line; anything else is a bug and keeps
    its traceback."""
    try:
        yield
    except FedtrustError as err:
        fail(str(err))
