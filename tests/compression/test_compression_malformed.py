"""A malformed payload (buggy or hostile device) raises a one-line ValueError, never decodes."""

from __future__ import annotations

import math

import pytest
import torch

from fedtrust.compression import CompressionSettings, decode, encode

SHAPES = {"enc.weight": (20, 10), "enc.bias": (10,), "head": (3, 10)}


def _payload(method: str, bits: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    update = {name: torch.randn(*shape, generator=gen) for name, shape in SHAPES.items()}
    settings = CompressionSettings(method=method, density=0.2, buckets=40, bits=bits)
    return encode(update, settings, seed=3)


def _set(key, value):
    def mutate(payload):
        payload[key] = value

    return mutate


def _drop(key):
    return lambda payload: payload.pop(key)


def _repeated_position(payload):
    """Varint gaps are sorted by construction; a zero gap repeats a position."""
    payload["enc.bias.pos"] = torch.tensor([2, 0], dtype=torch.uint8)
    payload["enc.bias.val"] = torch.ones(2)


SPARSE = [
    ("unknown key", _set("enc.weight.extra", torch.zeros(1))),
    ("unknown tensor", _set("decoder.idx", torch.zeros(1, dtype=torch.int32))),
    ("index too large", _set("enc.bias.idx", torch.tensor([0, 10], dtype=torch.int32))),
    ("negative index", _set("enc.bias.idx", torch.tensor([-1, 3], dtype=torch.int32))),
    ("positions not increasing", _repeated_position),
    ("duplicate index", _set("enc.bias.idx", torch.tensor([2, 2], dtype=torch.int32))),
    ("float indices", _set("enc.bias.idx", torch.tensor([1.0, 2.0]))),
    ("values too short", _set("enc.weight.val", torch.zeros(1))),
    ("nan value", lambda p: p["enc.weight.val"].__setitem__(0, math.nan)),
    ("inf value", lambda p: p["enc.weight.val"].__setitem__(0, math.inf)),
    ("values without indices", _drop("enc.weight.pos")),
    ("indices without values", _drop("enc.weight.val")),
    ("not a tensor", _set("enc.weight.val", [1.0, 2.0])),
    ("hash total without seed", _set("hash.total", torch.tensor(5))),
]

QUANTIZED = [
    ("too few bytes", lambda p: p.__setitem__("enc.weight.q", p["enc.weight.q"][:-1])),
    ("codes not uint8", lambda p: p.__setitem__("head.q", p["head.q"].to(torch.int32))),
    ("range reversed", lambda p: p.__setitem__("head.range", p["head.range"].flip(0))),
    ("range nan", _set("head.range", torch.tensor([math.nan, 1.0]))),
    ("range of three", _set("head.range", torch.zeros(3))),
    ("no bits", _drop("quant.bits")),
    ("bits zero", _set("quant.bits", torch.tensor(0, dtype=torch.int32))),
    ("bits seventeen", _set("quant.bits", torch.tensor(17, dtype=torch.int32))),
    ("float bits", _set("quant.bits", torch.tensor(4.0))),
    ("missing tensor", lambda p: [p.pop("head.q"), p.pop("head.range")]),
    ("plain values in a quantize payload", _set("head.val", torch.zeros(30))),
]

HASHED = [
    ("wrong bucket count", lambda p: p.__setitem__("head.buckets", p["head.buckets"][:-1])),
    ("total too large", _set("hash.total", torch.tensor(10_000))),
    ("total below tensors", _set("hash.total", torch.tensor(2))),
    ("float seed", _set("hash.seed", torch.tensor(1.5))),
    ("vector seed", _set("hash.seed", torch.tensor([1, 2]))),
    ("negative seed", _set("hash.seed", torch.tensor(-1))),
    ("missing tensor", _drop("enc.bias.buckets")),
    ("missing total", _drop("hash.total")),
    ("nan bucket", lambda p: p["head.buckets"].__setitem__(0, math.nan)),
    ("sparse field", _set("head.idx", torch.zeros(1, dtype=torch.int32))),
]

DENSE = [
    ("wrong shape", _set("head", torch.zeros(10, 3))),
    ("missing tensor", _drop("head")),
    ("integer tensor", _set("head", torch.zeros(3, 10, dtype=torch.int64))),
    ("nan entry", lambda p: p["head"].__setitem__((0, 0), math.nan)),
]


def _check_refused(payload, mutate):
    mutate(payload)
    with pytest.raises(ValueError) as error:
        decode(payload, SHAPES)
    assert "\n" not in str(error.value) and str(error.value)


@pytest.mark.parametrize("mutate", [m for _, m in SPARSE], ids=[i for i, _ in SPARSE])
def test_malformed_sparse_payloads(mutate):
    _check_refused(_payload("topk"), mutate)


@pytest.mark.parametrize("mutate", [m for _, m in QUANTIZED], ids=[i for i, _ in QUANTIZED])
def test_malformed_quantize_payloads(mutate):
    _check_refused(_payload("quantize", bits=5), mutate)


@pytest.mark.parametrize("mutate", [m for _, m in HASHED], ids=[i for i, _ in HASHED])
def test_malformed_hashed_payloads(mutate):
    _check_refused(_payload("hashed-diff"), mutate)


@pytest.mark.parametrize("mutate", [m for _, m in DENSE], ids=[i for i, _ in DENSE])
def test_malformed_dense_payloads(mutate):
    _check_refused(_payload("none"), mutate)


@pytest.mark.parametrize("method", ["none", "topk", "quantize", "hashed-diff"])
def test_the_unmutated_payloads_decode(method):
    """The mutations above are what breaks the payloads, not the fixtures."""
    decoded = decode(_payload(method, bits=5 if method == "quantize" else 0), SHAPES)
    assert {name: tuple(t.shape) for name, t in decoded.items()} == SHAPES


def test_a_quantised_sparse_payload_with_short_codes_is_refused():
    payload = _payload("topk", bits=3)
    name = next(key for key in payload if key.endswith(".q"))
    payload[name] = payload[name][:-1]
    with pytest.raises(ValueError, match="packed bytes"):
        decode(payload, SHAPES)
