"""Packaging: each top-level layer folder installs as `fedtrust.<folder>`.

Subpackages are found, never listed by hand, so a new one cannot drop out of the wheel
(tests/test_packaging.py checks it). Metadata and dependencies live in pyproject.toml.
"""

from setuptools import find_packages, setup

LAYERS = ("tasks", "privacy", "compression", "fairness", "clients", "server", "simulations")

setup(
    packages=["fedtrust"]
    + [
        f"fedtrust.{name}"
        for name in find_packages(include=[*LAYERS, *(f"{layer}.*" for layer in LAYERS)])
    ],
    package_dir={"fedtrust": "fedtrust", **{f"fedtrust.{layer}": layer for layer in LAYERS}},
)
