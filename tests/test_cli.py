"""`hf-r8` commands, the demo, and the offline fallback of Hub loading."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub.constants
import pytest
from rich.console import Console

import hf_r8
from hf_r8.cli import main
from hf_r8.control.config import available_presets
from hf_r8.demo.offline import hub_offline, hub_reachable, load_hub_or_offline
from hf_r8.demo.run import MODEL_SIZES, DemoSettings, run_demo
from hf_r8.ui.report import REPORT_DIR
from hf_r8.ui.run_log import METRICS_FILE, RUN_DIR

PACKAGE_DIR = Path(hf_r8.__file__).parent
HEAVY_MODULES = ("torch", "transformers", "peft", "datasets", "accelerate")


def _run_cli(arguments: list[str]) -> subprocess.CompletedProcess:
    """`hf-r8 ARGUMENTS` in a fresh interpreter, which then prints which of `HEAVY_MODULES` it imported."""
    script = textwrap.dedent(f"""
        import json, sys
        from hf_r8.cli import main
        try:
            main({arguments!r})
        finally:
            print(json.dumps([name for name in {HEAVY_MODULES!r} if name in sys.modules]))
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_presets_command_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    printed = capsys.readouterr().out
    assert all(name in printed for name in available_presets())


@pytest.mark.parametrize("command", ["presets", "config-reference"])
def test_commands_that_need_no_model_import_neither_torch_nor_transformers(command):
    result = _run_cli([command])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []
    assert "default" in result.stdout, "the command printed nothing: this test would prove nothing"


def test_the_demo_options_are_built_when_the_demo_is_asked_for(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--help"])
    assert exit_.value.code == 0
    printed = capsys.readouterr().out
    assert f"--model-size {{{','.join(sorted(MODEL_SIZES))}}}" in printed and "--offline" in printed


def _report_in_the_way(folder: Path) -> None:
    (folder / RUN_DIR).mkdir()
    (folder / RUN_DIR / METRICS_FILE).write_text('{"step": 1, "loss": 2.0}\n', encoding="utf-8")
    (folder / RUN_DIR / REPORT_DIR).write_text("a file")


@pytest.mark.parametrize(("make", "message"), [
    (lambda folder: None, f"no {METRICS_FILE} in it or in"),
    (lambda folder: (folder / METRICS_FILE).write_bytes(b"[1, 2]\nnull\n"), "no well-formed rows"),
    (_report_in_the_way, f"{REPORT_DIR}: exists and is not a folder"),
], ids=["no run files", "no well-formed row", "r8_report is a file"])
def test_report_says_what_is_wrong_with_the_folder_and_exits_non_zero(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path)])
    assert isinstance(exit_.value.code, str) and exit_.value.code.startswith("hf-r8 report: ")  # exit status 1
    assert message in exit_.value.code


def test_report_skips_malformed_rows_with_one_warning_line(tmp_path):
    rows = [json.dumps({"step": step, "loss": 3.0 - 0.1 * step, "lr": 1e-3}).encode() for step in range(1, 11)]
    (tmp_path / METRICS_FILE).write_bytes(b"\n".join([*rows, b'{"step": "7"}', b"\xff\xfe"]) + b"\n")
    result = _run_cli(["report", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert result.stderr == f"skipped 2 malformed rows in {tmp_path / METRICS_FILE}\n"
    assert (tmp_path / REPORT_DIR / "summary.md").is_file()


def test_every_third_party_import_of_the_package_is_a_declared_dependency():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((PACKAGE_DIR.parent / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")
                for requirement in requirements}

    required = names(project["dependencies"])
    extras = set().union(*(names(group) for group in project["optional-dependencies"].values()))
    distributions = importlib.metadata.packages_distributions()
    undeclared = set()
    for path in PACKAGE_DIR.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        at_import = {id(node) for node in tree.body}  # imported with the module: a hard dependency
        for node in ast.walk(tree):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for module in modules:
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top == "hf_r8":
                    continue
                declared = required if id(node) in at_import else required | extras
                found = {name.lower().replace("_", "-") for name in distributions.get(top, [top])}
                if not found & declared:
                    undeclared.add(f"{path.name}: {top}")
    assert not undeclared, sorted(undeclared)


def test_hub_loading_falls_back_offline_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model, tokenizer, source = load_hub_or_offline("gpt2")
    assert source == "offline:tiny-gpt2"
    assert model.config.vocab_size == len(tokenizer)


def test_unreachable_hub_is_put_in_offline_mode_for_the_block(monkeypatch):
    import datasets.config

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert not hub_reachable()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with hub_offline():
        assert huggingface_hub.constants.HF_HUB_OFFLINE and datasets.config.HF_HUB_OFFLINE
    assert not huggingface_hub.constants.HF_HUB_OFFLINE and not datasets.config.HF_HUB_OFFLINE


@pytest.mark.integration
def test_demo_falls_back_offline_compares_with_cosine_and_reports(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    console = Console(record=True, width=200)
    settings = DemoSettings(steps=8, model_size="tiny", batch_size=4, seq_len=64, dashboard=False,
                            output_dir=str(tmp_path))  # the comparison with the stock Trainer is the default
    summary = run_demo(settings, console=console)
    text = console.export_text()
    assert "offline: the Hub is unreachable" in text  # one line, then the fallback
    assert "cosine (stock Trainer)" in text and "hf_r8 (default)" in text
    assert 0 < summary["r8_eval_loss"] < 9.5 and 0 < summary["cosine_eval_loss"] < 9.5
    assert summary["rollbacks"] == 0 and summary["final_lr_gain"] > 0
    assert {"loss.png", "lr.png", "summary.md"} <= {path.name for path in (tmp_path / "r8" / "r8_report").iterdir()}
    assert (tmp_path / "compare.png").stat().st_size > 10_000 and "compare.png" in text


def test_demo_rejects_an_unknown_model_size():
    with pytest.raises(ValueError, match="model_size must be one of"):
        run_demo(DemoSettings(model_size="huge"))
