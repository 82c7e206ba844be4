"""Screening a round's replies: what a device sent is used only if the server can trust its form.

A reply is dropped, with the device and the reason logged, when the device raised (Flower's error
reply), did not answer within the round's timeout, or sent weights the global model cannot take
(missing or extra tensors, wrong shapes, NaN/Inf) or a non-finite metric. Dropping keeps the
global model unpoisoned by garbage; what a well-formed but malicious update can do is bounded by
`bound_update` and the robust aggregations (`fedtrust.server.robust`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedtrust.errors import FederationError

ARRAYS_KEY = "arrays"


@dataclass(frozen=True)
class Failure:
    device: int
    reason: str

    def to_json(self) -> dict[str, int | str]:
        return asdict(self)


class TooFewReplies(FederationError):
    """A round ended with fewer usable replies than the server needs."""

    def __init__(self, server_round: int, usable: int, needed: int, failures: list[Failure]):
        self.usable, self.failures = usable, failures
        reasons = describe(failures)
        super().__init__(
            f"round {server_round}: {usable} usable replies, {needed} needed "
            f"(server.min_replies); failures: {reasons}"
        )


def describe(failures: list[Failure], most: int = 5) -> str:
    """The first failures as "device d: reason", for one-line messages."""
    shown = "; ".join(f"device {f.device}: {f.reason}" for f in failures[:most])
    more = f" (and {len(failures) - most} more)" if len(failures) > most else ""
    return (shown or "none") + more


def screen_replies(
    replies: Iterable[Message],
    expected: dict[int, int],
    global_arrays: ArrayRecord,
    timeout: float = 0.0,
) -> tuple[list[Message], list[Failure]]:
    """The replies fit for aggregation and why the others (and the silent devices) were dropped.

    `expected`: node id -> device id of every node asked to train. A reply's device is the one
    its node was asked as (the id it states must agree). Usable replies come sorted by device.
    """
    shapes = {k: tuple(v.shape) for k, v in global_arrays.items()}
    usable: list[tuple[int, Message]] = []
    failures: list[Failure] = []
    answered: set[int] = set()
    for msg in replies:
        node = getattr(msg.metadata, "src_node_id", None)
        device = expected.get(node) if node is not None else _stated_device(msg)
        if device is None:
            continue  # not a node asked this round (a late reply to an earlier round)
        answered.add(device)
        reason = _problem(msg, device, shapes)
        if reason is None:
            usable.append((device, msg))
        else:
            failures.append(Failure(device, reason))
    late = f"no reply within server.round_timeout = {timeout:g} s" if timeout else "no reply"
    failures += [Failure(d, late) for d in sorted(set(expected.values()) - answered)]
    usable.sort(key=lambda pair: pair[0])
    return [m for _, m in usable], sorted(failures, key=lambda f: f.device)


def _stated_device(msg: Message) -> int | None:
    if msg.has_error() or "device" not in msg.content:
        return None
    return int(msg.content["device"]["device"])


def _problem(msg: Message, device: int, shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Why `msg` cannot be aggregated, or None."""
    if msg.has_error():
        lines = str(msg.error.reason).strip().splitlines() or ["unknown error"]
        return f"raised: {lines[-1]}"
    content = msg.content
    if ARRAYS_KEY not in content.array_records or "device" not in content.config_records:
        return "malformed reply: no weights or no device record"
    stated = int(content["device"]["device"])
    if stated != device:
        return f"malformed reply: says it is device {stated}"
    arrays = content[ARRAYS_KEY]
    if missing := sorted(set(shapes) - set(arrays)):
        return f"malformed weights: missing {', '.join(missing[:3])}"
    if extra := sorted(set(arrays) - set(shapes)):
        return f"malformed weights: unexpected {', '.join(extra[:3])}"
    for key, array in arrays.items():
        if tuple(array.shape) != shapes[key]:
            return f"malformed weights: {key} has shape {tuple(array.shape)}, not {shapes[key]}"
        if not np.isfinite(array.numpy()).all():
            return f"non-finite weights in {key}"
    for record in content.metric_records.values():
        for key, value in record.items():
            if not np.isfinite(np.asarray(value, dtype=float)).all():
                return f"non-finite metric {key} = {value}"
    return None


def update_norm(arrays: ArrayRecord, global_arrays: ArrayRecord) -> float:
    """The L2 norm of a reply's update (its weights minus the global model), over all tensors."""
    total = 0.0
    for key, g in global_arrays.items():
        diff = arrays[key].numpy().astype(np.float64) - g.numpy()
        total += float(np.sum(diff * diff))
    return float(np.sqrt(total))


def bound_update(arrays: ArrayRecord, global_arrays: ArrayRecord, max_norm: float) -> ArrayRecord:
    """The reply's weights with its update scaled down to L2 norm <= `max_norm` (norm bounding,
    Sun et al. 2019: a lying device moves the average at most as far as an honest one may)."""
    norm = update_norm(arrays, global_arrays)
    if norm <= max_norm:
        return arrays
    scale = max_norm / norm
    out = {}
    for key, g in global_arrays.items():
        old = g.numpy()
        out[key] = Array(np.asarray(old + scale * (arrays[key].numpy() - old), dtype=old.dtype))
    return ArrayRecord(out)
