"""The house rules that keep fedtrust readable: one-way layers, small modules, light imports."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (
    "fedtrust",
    "tasks",
    "privacy",
    "compression",
    "fairness",
    "clients",
    "server",
    "simulations",
)
MODULES = sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))
MAX_LINES = 400


def _lint_copy(tmp_path: Path, plant: tuple[str, str] | None = None) -> subprocess.CompletedProcess:
    """import-linter (pyproject.toml) on a copy laid out as the installed package: the editable
    install maps each layer folder separately, which import-linter cannot follow. `plant`:
    (module file, line) appended to the copy first."""
    for layer in LAYERS:
        target = tmp_path / "fedtrust" if layer == "fedtrust" else tmp_path / "fedtrust" / layer
        shutil.copytree(ROOT / layer, target, dirs_exist_ok=True, ignore=_not_python)
    if plant is not None:
        with (tmp_path / "fedtrust" / plant[0]).open("a") as f:
            f.write(plant[1] + "\n")
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    return subprocess.run(
        [lint, str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_import_contract_holds(tmp_path):
    """simulations > clients | server > fairness > privacy | tasks > errors; no Flower or Ray
    in the libraries."""
    result = _lint_copy(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:]


@pytest.mark.parametrize(
    "plant",
    [
        ("clients/train.py", "import fedtrust.server.app"),  # sideways between the apps
        ("privacy/noise.py", "import fedtrust.simulations.config"),  # a library looking up
        ("tasks/spec.py", "import flwr"),  # the federation stack inside a library
    ],
    ids=["clients->server", "privacy->simulations", "tasks->flwr"],
)
def test_the_contract_fails_a_wrong_way_import(tmp_path, plant):
    result = _lint_copy(tmp_path, plant)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout[-2000:]


def _not_python(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if not n.endswith(".py") and not (Path(folder) / n).is_dir()]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_hides_inside_a_function(path):
    """A function-level import is how a cycle gets dodged; only a marked optional dependency
    (`# lazy: why`) may be imported late."""
    source = path.read_text()
    lines = source.splitlines()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    line = lines[inner.lineno - 1]
                    assert "# lazy:" in line, f"{path.name}:{inner.lineno}: {line.strip()}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def _run(code: str) -> None:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_dp_engine_works_without_the_extras_installed():
    """`pip install fedtrust` (no extras) is enough for fedtrust.privacy: with the extras'
    packages made unimportable, the engine still imports and trains a private step."""
    _run(
        "import sys\n"
        "EXTRAS = {'flwr', 'ray', 'transformers', 'datasets', 'matplotlib', 'typer', 'rich'}\n"
        "class Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in EXTRAS:\n"
        "            raise ImportError(f'{name} is not installed')\n"
        "sys.meta_path.insert(0, Missing())\n"
        "import torch\n"
        "from fedtrust.privacy import PrivacyEngine\n"
        "import fedtrust.privacy.attacks\n"
        "model = torch.nn.Linear(4, 2)\n"
        "data = torch.utils.data.TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,)))\n"
        "loader = torch.utils.data.DataLoader(data, batch_size=16)\n"
        "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
        "model, opt, loader = PrivacyEngine().make_private(module=model, optimizer=opt,\n"
        "    data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)\n"
        "x, y = next(iter(loader))\n"
        "torch.nn.functional.cross_entropy(model(x), y).backward()\n"
        "opt.step()\n"
    )


def test_importing_fedtrust_leaves_the_matplotlib_backend_alone():
    names = [_dotted(p.with_suffix("")).removesuffix(".__init__") for p in MODULES]
    _run(
        "import importlib, matplotlib\n"
        "matplotlib.use('svg')\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
    )


def test_every_subpackage_is_packaged():
    """setup.py finds subpackages itself: a new folder with __init__.py cannot drop out."""
    with mock.patch.object(setuptools, "setup") as setup:
        exec(compile((ROOT / "setup.py").read_text(), "setup.py", "exec"), {"__name__": "x"})
    packages = set(setup.call_args.kwargs["packages"])
    inits = [init for layer in LAYERS for init in (ROOT / layer).rglob("__init__.py")]
    on_disk = {_dotted(init.parent) for init in inits}
    assert packages == on_disk


def _dotted(path: Path) -> str:
    """The installed name of a repository path: server/app -> fedtrust.server.app."""
    parts = path.relative_to(ROOT).parts
    return ".".join(parts if parts[0] == "fedtrust" else ("fedtrust", *parts))
