"""Where DP randomness comes from: the operating system's entropy pool, unless told otherwise.

A DP guarantee holds only if nobody but the mechanism can predict its noise and its batch
sampling. fedtrust therefore seeds a fresh torch generator with 63 bits from `secrets` (the OS
CSPRNG) for every noise draw and every Poisson sampler. torch's CPU generator (MT19937) and
CUDA generator (Philox) are not cryptographic streams themselves, but a seed nobody else holds
cannot be replayed: guessing it means searching 2^63 seeds per step. A caller who passes an
explicit generator (reproducible simulations) gives that guarantee up against whoever holds
its seed.
"""

from __future__ import annotations

import secrets

import torch

REPRODUCIBLE_NOISE_WARNING = (
    "reproducible noise seeded from the run seed: NO privacy against anyone knowing the seed"
)


def os_entropy_seed() -> int:
    """63 bits from the OS CSPRNG: a torch seed no configuration file can reproduce."""
    return secrets.randbits(63)


def fresh_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator on `device` seeded from OS entropy."""
    generator = torch.Generator(device=device)
    generator.manual_seed(os_entropy_seed())
    return generator
