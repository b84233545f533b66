"""The layers of `hf_r8/` (docs/architecture.md): the control layer is pure Python, and `import hf_r8` is light."""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import hf_r8.control
from tests.control.conftest import BLOCKED


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_the_control_layer_imports_with_torch_and_transformers_blocked():
    modules = [f"hf_r8.control.{module.name}" for module in pkgutil.iter_modules(hf_r8.control.__path__)]
    assert "hf_r8.control.controller" in modules and len(modules) >= 8, modules
    result = _run(f"""
        import importlib, sys
        for name in {BLOCKED!r}:
            sys.modules[name] = None  # `import torch` now raises ImportError
        for module in {modules!r}:
            importlib.import_module(module)
        print("imported", len({modules!r}))
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"imported {len(modules)}" in result.stdout


def test_the_control_layers_tests_pass_with_the_frameworks_blocked():
    tests = Path(__file__).parent
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "control")],
                            capture_output=True, text=True, timeout=600, cwd=tests.parent,
                            env={**os.environ, "HF_R8_BLOCK_FRAMEWORKS": "1"})
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and "error" not in result.stdout.splitlines()[-1]


def test_import_hf_r8_loads_no_framework_until_an_adapter_is_used():
    result = _run(f"""
        import sys
        import hf_r8
        config = hf_r8.R8Config.from_preset("default")
        print(sorted(name for name in {BLOCKED!r} if name in sys.modules))
        hf_r8.R8Callback
        print("torch" in sys.modules and "transformers" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[:2] == ["[]", "True"]


LAYERS = ("control", "runtime", "data", "ui", "integrations")  # each may import only those before it


def test_each_layer_imports_only_the_layers_below_it():
    import ast
    from pathlib import Path

    package = Path(hf_r8.control.__file__).parent.parent
    upward = []
    for layer_rank, layer in enumerate(LAYERS):
        for path in (package / layer).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_r8."):
                    imported = node.module.split(".")[1]
                    if imported not in LAYERS[:layer_rank + 1]:
                        upward.append(f"{layer}/{path.name} imports {node.module}")
    assert not upward, upward
