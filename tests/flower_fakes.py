"""Stand-ins for the parts of a Flower run a strategy test needs: replies and a grid."""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import RecordDict


@dataclass
class Reply:
    """A device's reply as Flower's strategies read it (content, and no error)."""

    content: RecordDict
    error: object = None
    metadata: object = field(default=None)

    def has_error(self) -> bool:
        return self.error is not None


class FakeGrid:
    """A grid of `n` connected nodes with ids 100, 101, ..."""

    def __init__(self, n: int = 4) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return [100 + d for d in range(self.n)]
