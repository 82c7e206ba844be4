"""Screening a round's replies: what a device sent is used only if the server can trust its form.

A reply is dropped, with the device and the reason logged, when the device raised (Flower's error
reply), did not answer within the round's timeout, or sent weights the global model cannot take
(missing or extra tensors, wrong shapes, NaN/Inf) or a non-finite metric. Dropping keeps the
global model unpoisoned by garbage; what a well-formed but malicious update can do is bounded by
`bound_update` and the robust aggregations (`fedtrust.server.robust`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fedtrust.errors import FederationError

ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"


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
    decode: Callable[[ArrayRecord], ArrayRecord] | None = None,
) -> tuple[list[Message], list[Failure], list[Message]]:
    """The replies fit for aggregation, why the others (and the silent devices) were dropped,
    and every reply that answered as the device its node was asked as (usable or not: its
    device record, e.g. a DP budget report, is still that device's word).

    `expected`: node id -> device id of every node asked to train. Usable replies come sorted
    by device, their weights in the global model's dtypes (a reply of another float precision
    is cast, one of another kind dropped). `decode`: turns a compressed reply's weights into
    dense ones first (a ValueError drops the reply as undecodable).
    """
    specs = {k: (tuple(v.shape), v.numpy().dtype) for k, v in global_arrays.items()}
    usable: list[tuple[int, Message]] = []
    failures: list[Failure] = []
    identified: list[Message] = []
    answered: set[int] = set()
    for msg in replies:
        node = getattr(msg.metadata, "src_node_id", None)
        device = expected.get(node) if node is not None else _stated_device(msg)
        if device is None:
            continue  # not a node asked this round (a late reply to an earlier round)
        answered.add(device)
        reason = _identity_problem(msg, device)
        if reason is None:
            identified.append(msg)
            reason = _decode(msg.content, decode) if decode is not None else None
            reason = reason or _content_problem(msg.content, specs)
        if reason is None:
            usable.append((device, msg))
        else:
            failures.append(Failure(device, reason))
    usable = _same_metric_keys(usable, failures)
    for _, msg in usable:  # float32 from a device, float64 global after FedAdam: the global's
        _cast_weights(msg.content, specs)
    late = f"no reply within server.round_timeout = {timeout:g} s" if timeout else "no reply"
    failures += [Failure(d, late) for d in sorted(set(expected.values()) - answered)]
    usable.sort(key=lambda pair: pair[0])
    return [m for _, m in usable], sorted(failures, key=lambda f: f.device), identified


def _decode(content: RecordDict, decode: Callable[[ArrayRecord], ArrayRecord]) -> str | None:
    """Replace a compressed reply's weights by the dense ones; why it cannot be, or None."""
    if ARRAYS_KEY not in content.array_records:
        return None  # _content_problem names it
    try:
        content[ARRAYS_KEY] = decode(content[ARRAYS_KEY])
    except ValueError as err:
        return f"undecodable update: {err}"
    return None


def _stated_device(msg: Message) -> int | None:
    try:
        return int(msg.content["device"]["device"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _identity_problem(msg: Message, device: int) -> str | None:
    """Why `msg` is not a well-formed answer of `device`, or None."""
    if msg.has_error():
        lines = str(msg.error.reason).strip().splitlines() or ["unknown error"]
        return f"raised: {lines[-1]}"
    if "device" not in msg.content.config_records:
        return "malformed reply: no device record"
    info = msg.content["device"]
    if not isinstance(info.get("device"), int) or not isinstance(info.get("available"), int):
        return "malformed reply: its device record lacks an integer device or available"
    if info["device"] != device:
        return f"malformed reply: says it is device {info['device']}"
    return None


def _content_problem(
    content: RecordDict, specs: dict[str, tuple[tuple[int, ...], np.dtype]]
) -> str | None:
    """Why the weights and metrics of a reply cannot be aggregated, or None."""
    if ARRAYS_KEY not in content.array_records:
        return "malformed reply: no weights"
    if extra := sorted(set(content.array_records) - {ARRAYS_KEY, "fisher"}):
        return f"malformed reply: unexpected weight records {', '.join(extra)}"
    if set(content.metric_records) != {METRICS_KEY}:
        return f"malformed reply: needs exactly one metric record '{METRICS_KEY}'"
    arrays = content[ARRAYS_KEY]
    if missing := sorted(set(specs) - set(arrays)):
        return f"malformed weights: missing {', '.join(missing[:3])}"
    if extra := sorted(set(arrays) - set(specs)):
        return f"malformed weights: unexpected {', '.join(extra[:3])}"
    for key, array in arrays.items():
        shape, dtype = specs[key]
        if tuple(array.shape) != shape:
            return f"malformed weights: {key} has shape {tuple(array.shape)}, not {shape}"
        try:
            kind = np.dtype(array.dtype).kind
            values = array.numpy() if kind == dtype.kind else None
        except Exception as err:  # corrupt bytes: whatever numpy raises, the reply is unusable
            return f"malformed weights: {key} cannot be read ({type(err).__name__})"
        if values is None:
            return f"malformed weights: {key} is {array.dtype}, not {dtype}"
        if not np.isfinite(values).all():
            return f"non-finite weights in {key}"
    for key, value in content[METRICS_KEY].items():
        if not np.isfinite(np.asarray(value, dtype=float)).all():
            return f"non-finite metric {key} = {value}"
    return None


def _cast_weights(content: RecordDict, specs: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
    arrays = content[ARRAYS_KEY]
    if any(np.dtype(arrays[k].dtype) != dtype for k, (_, dtype) in specs.items()):
        content[ARRAYS_KEY] = ArrayRecord(
            {
                k: Array(np.asarray(arrays[k].numpy(), dtype=dtype))
                for k, (_, dtype) in specs.items()
            }
        )


def _same_metric_keys(
    usable: list[tuple[int, Message]], failures: list[Failure]
) -> list[tuple[int, Message]]:
    """Flower's strategies need every reply to carry the same metrics: keep the replies with
    the most common set of metric names, drop the others."""
    keys = [frozenset(m.content[METRICS_KEY].keys()) for _, m in usable]
    if len(set(keys)) <= 1:
        return usable
    common = Counter(keys).most_common(1)[0][0]
    for (device, _), k in zip(usable, keys):
        if k != common:
            names = ", ".join(sorted(k ^ common))
            failures.append(
                Failure(device, f"malformed reply: metrics differ from the others ({names})")
            )
    return [pair for pair, k in zip(usable, keys) if k == common]


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
