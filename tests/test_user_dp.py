"""User-level DP (DP-FedAvg) on the server: properties of the mechanism, sampler and accountant.

Hand-made replies, no network. Every test states a property of what is released, not of how.
"""

from __future__ import annotations

import numpy as np
import pytest
from flower_fakes import FakeGrid, Reply
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam

from fedtrust.privacy.accounting import compute_epsilon, default_delta
from fedtrust.server.registry import DeviceRegistry
from fedtrust.server.selection import capped_inclusion
from fedtrust.server.user_dp import DPFedAvg
from fedtrust.simulations.config import load_config
from fedtrust.simulations.federation import make_strategy

DIM = 20


pytestmark = pytest.mark.usefixtures("run_identity")


def _cfg(n, k, *extra):
    return load_config(
        None,
        [
            f"partition.num_devices={n}",
            f"selection.devices_per_round={k}",
            'privacy.level="user"',
            "privacy.noise_multiplier=1.0",
            "privacy.max_grad_norm=0.5",
            "privacy.accountant=rdp",
            "server.rounds=10",
            *extra,
        ],
    )


def _strategy(cfg, counts):
    n = len(counts)
    registry = DeviceRegistry({d: 100 + d for d in range(n)}, metadata=lambda r: counts)
    return make_strategy(cfg, registry, n)


def _mech(**settings) -> DPFedAvg:
    """A DP-FedAvg mechanism with reproducible randomness; `settings` override the defaults."""
    defaults = dict(
        noise_multiplier=1.0,
        clip=0.5,
        devices_per_round=2,
        num_devices=4,
        max_inclusion=0.5,
        capped=False,
        delta=1e-5,
        accountant="pld",
        seed=0,
        reproducible=True,
    )
    return DPFedAvg(**(defaults | settings))


def _arrays(values):
    return ArrayRecord({"w": Array(np.asarray(values, dtype=np.float32))})


def _reply(device, values, n=5):
    return Reply(
        RecordDict(
            {
                "arrays": _arrays(values),
                "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0}),
                "device": ConfigRecord({"device": device, "available": n}),
            }
        )
    )


def _sampled(messages):
    return sorted(m.metadata.dst_node_id - 100 for m in messages)


def _round(strategy, server_round, glob, deltas, grid, keep=None):
    """One round: every sampled device replies with global + its delta (optionally only some)."""
    sampled = _sampled(strategy.configure_train(server_round, glob, ConfigRecord({}), grid))
    if keep is not None:
        sampled = keep(sampled)
    g = glob["w"].numpy()
    arrays, metrics = strategy.aggregate_train(
        server_round, [_reply(d, g + deltas[d]) for d in sampled]
    )
    return arrays, sampled


# 1. noise before the server optimizer -------------------------------------------------------


@pytest.fixture
def optimizer_inputs(monkeypatch):
    """Record what Flower's FedAdam is asked to aggregate: the server optimizer's input."""
    seen = []
    original = FedAdam.aggregate_train

    def spy(self, server_round, replies):
        replies = list(replies)
        assert len(replies) == 1  # one synthetic reply: global + noisy mean
        new = replies[0].content["arrays"]["w"].numpy().astype(np.float64)
        seen.append(new - self.current_arrays["w"].astype(np.float64))
        return original(self, server_round, replies)

    monkeypatch.setattr(FedAdam, "aggregate_train", spy)
    return seen


def test_one_device_moves_the_fedadam_input_by_at_most_c_over_k(optimizer_inputs):
    """Neighbouring populations (device 5 there or not), zero noise, FedAdam at server_lr 0.1."""
    n = k = 6  # every device sampled (q = 1): the only difference is device 5's update
    clip = 0.05
    rng = np.random.default_rng(0)
    deltas = rng.normal(size=(n, DIM)) * 10  # norms ~ 45 >> C: every update is clipped
    runs = {}
    for name, keep in {"with": None, "without": lambda s: [d for d in s if d != 5]}.items():
        cfg = _cfg(
            n,
            k,
            "server.aggregation=fedadam",
            "server.server_lr=0.1",
            f"privacy.max_grad_norm={clip}",
        )
        strategy = _strategy(cfg, np.full(n, 5))
        strategy.user_dp.noise_multiplier = 0.0
        glob, grid = _arrays(np.zeros(DIM)), FakeGrid(n)
        start = len(optimizer_inputs)
        models = []
        for r in range(1, 6):
            glob, _ = _round(strategy, r, glob, deltas, grid, keep)
            models.append(glob["w"].numpy().astype(np.float64))
        runs[name] = (optimizer_inputs[start:], models)
    inputs_with, models_with = runs["with"]
    inputs_without, models_without = runs["without"]
    for a, b in zip(inputs_with, inputs_without, strict=True):
        change = np.linalg.norm(a - b)
        assert change <= clip / k * (1 + 1e-4)
        assert change == pytest.approx(clip / k, rel=1e-3)  # device 5's clipped update / k
    # FedAdam itself is not bounded this way: its step normalises per coordinate, so one device
    # can move the model by far more than C/k. That is why the noise must come before it.
    assert np.linalg.norm(models_with[0] - models_without[0]) > 3 * clip / k


def test_populations_with_the_same_noisy_means_get_identical_fedadam_models():
    """The model is a function of the released means only (noise on, reproducible noise)."""
    n = k = 4
    clip = 1.0
    rng = np.random.default_rng(1)
    base = rng.normal(size=(n, DIM))
    base *= 0.3 / np.linalg.norm(base, axis=1, keepdims=True)  # within C: no clipping
    shift = rng.normal(size=DIM)
    shift *= 0.1 / np.linalg.norm(shift)
    other = base.copy()
    other[0] += shift
    other[1] -= shift  # other individual updates, same sum
    different = base.copy()
    different[0] += shift  # another sum
    models = {}
    for name, deltas in {"base": base, "other": other, "different": different}.items():
        cfg = _cfg(
            n,
            k,
            "server.aggregation=fedadam",
            "server.server_lr=0.1",
            f"privacy.max_grad_norm={clip}",
            "privacy.noise_multiplier=2.0",
            "privacy.reproducible_noise=true",
        )
        strategy = _strategy(cfg, np.full(n, 5))
        glob, grid = _arrays(np.zeros(DIM)), FakeGrid(n)
        for r in range(1, 6):
            glob, _ = _round(strategy, r, glob, deltas, grid)
        models[name] = glob["w"].numpy()
        assert set(strategy.state()) == {"m_t", "v_t"}
    assert np.allclose(models["base"], models["other"], rtol=0, atol=1e-6)
    assert not np.allclose(models["base"], models["different"], rtol=0, atol=1e-3)


# 2. activity selection: capped inclusion, ε independent of the data --------------------------


def test_epsilon_with_a_huge_device_equals_epsilon_of_the_uniform_population():
    n, k = 20, 4
    uniform, huge = np.full(n, 10), np.full(n, 10)
    huge[7] = 10_000  # one device holding 1000x more data
    reports = {}
    for name, counts in {"uniform": uniform, "huge": huge}.items():
        for target in (0.0, 3.0):
            cfg = _cfg(
                n,
                k,
                "selection.strategy=activity",
                "privacy.activity_reference=10",
                f"privacy.target_epsilon={target}",
            )
            strategy = _strategy(cfg, counts)
            reports[name, target] = strategy.privacy(10)
    for target in (0.0, 3.0):
        assert reports["huge", target] == reports["uniform", target]
        assert reports["huge", target]["sample_rate"] == pytest.approx(min(1, 2 * k / n))
    assert reports["huge", 3.0]["epsilon"] == pytest.approx(3.0, abs=0.05)


def test_no_device_is_included_more_often_than_the_cap():
    n, k, rounds = 20, 4, 3000
    counts = np.full(n, 10)
    counts[7] = 10_000
    cfg = _cfg(
        n,
        k,
        "selection.strategy=activity",
        "privacy.activity_reference=10",
        "privacy.reproducible_noise=true",
    )
    strategy = _strategy(cfg, counts)
    q_max = strategy.privacy(1)["sample_rate"]
    assert q_max == pytest.approx(0.4)
    hits = np.zeros(n)
    glob, grid = _arrays(np.zeros(DIM)), FakeGrid(n)
    for r in range(1, rounds + 1):
        hits[_sampled(strategy.configure_train(r, glob, ConfigRecord({}), grid))] += 1
    freq = hits / rounds
    tolerance = 4 * np.sqrt(q_max * (1 - q_max) / rounds)
    assert freq.max() <= q_max + tolerance
    assert freq[7] == pytest.approx(q_max, abs=tolerance)  # the huge device: capped, not ~1
    light = k / n  # the others hold the reference count: the uniform rate, unaffected by device 7
    assert np.allclose(np.delete(freq, 7), light, atol=4 * np.sqrt(light / rounds))


# 3. the sampler is the one the accountant analyses ------------------------------------------


@pytest.mark.parametrize("strategy_name", ["uniform", "activity"])
def test_poisson_inclusion_frequencies_and_varying_sample_size(strategy_name):
    counts = np.array([1, 2, 4, 8, 16, 32, 64, 5, 3, 9])
    n, k, rounds = len(counts), 3, 4000
    cfg = _cfg(
        n,
        k,
        f"selection.strategy={strategy_name}",
        "privacy.activity_reference=8",
        "privacy.reproducible_noise=true",
    )
    strategy = _strategy(cfg, counts)
    if strategy_name == "uniform":
        expected = np.full(n, k / n)
    else:
        expected = capped_inclusion(counts.astype(float), 8.0, k / n, min(1, 2 * k / n))
        assert expected.max() == pytest.approx(0.6)  # heavy devices capped at q_max
    hits, sizes = np.zeros(n), []
    glob, grid = _arrays(np.zeros(DIM)), FakeGrid(n)
    for r in range(1, rounds + 1):
        chosen = _sampled(strategy.configure_train(r, glob, ConfigRecord({}), grid))
        assert strategy.last_selection == {"devices_sampled": len(chosen)}  # no device ids
        hits[chosen] += 1
        sizes.append(len(chosen))
    sd = np.sqrt(expected * (1 - expected) / rounds)
    assert np.all(np.abs(hits / rounds - expected) <= 4 * sd)
    assert len(set(sizes)) >= 4  # not always k
    assert np.mean(sizes) == pytest.approx(expected.sum(), abs=0.1)


def test_sampling_and_noise_use_os_entropy_unless_reproducible():
    n, k = 6, 3
    deltas = np.zeros((n, DIM))

    def released(*extra):
        strategy = _strategy(_cfg(n, k, *extra), np.full(n, 5))
        glob, grid = _arrays(np.zeros(DIM)), FakeGrid(n)
        out = [_round(strategy, r, glob, deltas, grid) for r in (1, 2, 3)]
        return [a["w"].numpy() for a, _ in out], [s for _, s in out]

    a, b = released(), released()
    assert not np.allclose(a[0][0], b[0][0])  # two runs with the same run.seed differ
    c, d = released("privacy.reproducible_noise=true"), released("privacy.reproducible_noise=true")
    assert all(np.array_equal(x, y) for x, y in zip(c[0], d[0], strict=True))
    assert c[1] == d[1]


# 4. fewer replies never shrink the noise -----------------------------------------------------


def test_three_replies_of_five_expected_keep_noise_sigma_c_over_k():
    sigma, clip, k = 2.0, 0.5, 5
    mech = _mech(noise_multiplier=sigma, clip=clip, devices_per_round=k, num_devices=10)
    glob = {"w": np.zeros(DIM)}
    zeros = [{"w": np.zeros(DIM)} for _ in range(3)]
    noise = np.concatenate([mech.release(glob, zeros, r)["w"] for r in range(1, 501)])
    assert noise.std() == pytest.approx(sigma * clip / k, rel=0.03)  # 0.2, not 0.333


def test_dropouts_in_the_strategy_keep_noise_sigma_c_over_k():
    """The whole server path: 5 devices expected per round, at most 3 of them reply."""
    n, k, rounds = 10, 5, 500
    sigma, clip = 2.0, 0.5
    cfg = _cfg(
        n,
        k,
        f"privacy.noise_multiplier={sigma}",
        f"privacy.max_grad_norm={clip}",
        "privacy.reproducible_noise=true",
    )
    strategy = _strategy(cfg, np.full(n, 5))
    glob, grid = _arrays(np.zeros(DIM)), FakeGrid(n)
    zeros = np.zeros((n, DIM))
    noise = []
    for r in range(1, rounds + 1):
        arrays, replied = _round(strategy, r, glob, zeros, grid, keep=lambda s: s[:3])
        assert len(replied) <= 3
        noise.append(arrays["w"].numpy())
    assert np.std(noise) == pytest.approx(sigma * clip / k, rel=0.04)


def test_a_round_nobody_can_answer_still_releases_noise():
    n, k = 6, 3
    strategy = _strategy(_cfg(n, k, "server.aggregation=fedadam"), np.zeros(n, dtype=int))
    glob = _arrays(np.zeros(DIM))
    messages = list(strategy.configure_train(1, glob, ConfigRecord({}), FakeGrid(n)))
    assert messages == []  # sampled devices hold no data: nothing to ask
    arrays, metrics = strategy.aggregate_train(1, [])
    released = arrays["w"].numpy()
    assert np.all(np.isfinite(released)) and np.abs(released).max() > 0
    assert metrics is None  # no per-device metric is released
    assert strategy.privacy(1)["epsilon"] > 0  # and the round is accounted


def test_more_devices_per_round_than_devices_is_a_one_line_error():
    cfg = _cfg(10, 6)  # natural partitions: the config cannot know the population size
    with pytest.raises(ValueError, match=r"selection.devices_per_round = 6 .*\(4 devices\)") as err:
        _strategy(cfg, np.full(4, 5))
    assert "\n" not in str(err.value)


def test_delta_at_or_above_one_over_n_is_refused():
    with pytest.raises(ValueError, match="privacy.target_delta") as err:
        _strategy(_cfg(10, 3, "privacy.target_delta=0.1"), np.full(10, 5))
    assert "\n" not in str(err.value)


# 5. ε report -----------------------------------------------------------------------------------


def test_epsilon_report_names_what_it_guarantees():
    n, k = 10, 3
    report = _strategy(_cfg(n, k), np.full(n, 5)).privacy(4)
    assert report["delta"] == default_delta(n)
    assert report["relation"] == "add/remove one device"
    assert report["accountant"] == "rdp"
    assert report["sample_rate"] == pytest.approx(k / n)
    assert report["noise_multiplier"] == 1.0
    assert report["epsilon"] == pytest.approx(
        compute_epsilon([(1.0, k / n, 4)], default_delta(n), "rdp")
    )


# 5. the one-run audit with canary devices passes the mechanism and fails a broken one -------


@pytest.mark.parametrize("broken", [False, True])
def test_canary_device_audit_passes_dp_fedavg_and_fails_it_with_a_tenth_of_the_noise(broken):
    claimed_sigma, rounds, q = 9.0, 30, 1.0  # every device in every round: the tightest audit
    claimed = compute_epsilon([(claimed_sigma, q, rounds)], 1e-5, "pld")
    mech = _mech(
        noise_multiplier=claimed_sigma / 10 if broken else claimed_sigma,
        devices_per_round=4,
        max_inclusion=q,
        seed=3,
    )
    mech.audit_canaries = 1000
    glob = {"w": np.zeros((40, 50))}
    real = [{"w": np.full((40, 50), 0.001)} for _ in range(4)]
    for r in range(1, rounds + 1):
        mech.release(glob, real, r)
    audited = mech.canaries.audit(1e-5).epsilon_lower_bound
    if broken:
        assert audited > claimed  # the mechanism does not deliver the ε it claims
    else:
        assert 0 < audited <= claimed


def test_canary_devices_survive_a_checkpoint():
    def mech():
        m = _mech()
        m.audit_canaries = 50
        return m

    glob = {"w": np.zeros(100)}
    first = mech()
    first.release(glob, [], 1)
    resumed = mech()
    resumed.load_state(first.state())
    resumed.release(glob, [], 2)
    assert resumed.canaries.steps == 2
    assert np.array_equal(resumed.canaries.included, first.canaries.included)
    assert np.array_equal(resumed.canaries.coordinates, first.canaries.coordinates)
