"""The GPT-2 WikiText notebook runs top to bottom (offline, a few steps), as CI's check that it still works."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.integration

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "gpt2_wikitext.ipynb"


def test_notebook_executes_with_tiny_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_R8_NOTEBOOK_STEPS", "6")
    monkeypatch.setenv("HF_R8_NOTEBOOK_MODEL_SIZE", "tiny")
    monkeypatch.setenv("HF_R8_NOTEBOOK_OUTPUT", str(tmp_path / "run"))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    text = "".join(output.get("text", "") + str(output.get("data", {}).get("text/plain", "")) for output in outputs)
    assert "held-out loss" in text and "rejected: decision.increase_factor=0.5" in text
    assert sum("image/png" in output.get("data", {}) for output in outputs) >= 2  # the report's plots, inline
    assert (tmp_path / "run" / "r8_events.jsonl").is_file()
