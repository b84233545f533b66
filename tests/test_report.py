"""`write_report`: both layouts of the run files, damaged rows skipped with a count, errors that say what is
wrong with the folder, and drawing that leaves pyplot and the process's matplotlib backend alone."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hf_r8.ui.report import REPORT_DIR, write_report
from hf_r8.ui.run_log import EVENTS_FILE, METRICS_FILE, RANGE_TEST_FILE


def _write_run(folder: Path, steps: int = 30) -> None:
    """Run files as RunLog writes them: a falling loss, a decision and a guard skip."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = [{"step": step, "loss": 3.0 - 0.02 * step, "lr": 1e-3, "base_lr": 1e-3, "gain": 1.0,
                "elapsed_s": 0.1 * step} for step in range(1, steps + 1)]
    events = [{"step": 10, "kind": "decision/increase", "group": 0, "old": 1.0, "new": 1.2, "reason": "falling"},
              {"step": 20, "kind": "guard/skip_step", "group": -1, "old": 1.0, "new": 0.0, "reason": "nan"}]
    (folder / METRICS_FILE).write_text("".join(json.dumps(row) + "\n" for row in metrics), encoding="utf-8")
    (folder / EVENTS_FILE).write_text("".join(json.dumps(row) + "\n" for row in events), encoding="utf-8")


@pytest.mark.parametrize("layout", ["r8", "."])
def test_the_report_is_written_next_to_the_run_files_in_either_layout(tmp_path, layout):
    files_dir = tmp_path / layout
    _write_run(files_dir)
    written = write_report(tmp_path)
    assert {path.name for path in written} == {"loss.png", "lr.png", "summary.md"}
    assert all(path.parent == files_dir / REPORT_DIR and path.stat().st_size > 0 for path in written)
    summary = (files_dir / REPORT_DIR / "summary.md").read_text()
    assert "30 steps recorded" in summary and "| guard/skip_step | 1 |" in summary


def test_malformed_rows_are_skipped_with_one_warning_per_file(tmp_path, caplog):
    _write_run(tmp_path)
    bad_metrics = [b"[1, 2]", b'{"loss": 1.0}', b'{"step": "7", "loss": 1.0}', b"null", b'{"step": 31, "loss": \xff}',
                   b'{"step": true, "loss": 1.0}', b'{"step": 32, "lo']  # the last: cut short by a crash
    with (tmp_path / METRICS_FILE).open("ab") as metrics:
        metrics.write(b"\n".join(bad_metrics) + b"\n")
    with (tmp_path / EVENTS_FILE).open("ab") as events:
        events.write(b'{"step": 12}\n{"step": 13, "kind": 4}\n')
    with caplog.at_level(logging.WARNING, logger="hf_r8.ui.report"):
        written = write_report(tmp_path)
    assert [record.getMessage() for record in caplog.records] == [
        f"skipped 7 malformed rows in {tmp_path / METRICS_FILE}",
        f"skipped 2 malformed rows in {tmp_path / EVENTS_FILE}",
    ]
    summary = written[-1].read_text()
    assert "30 steps recorded (last step 30)" in summary and "| decision/increase | 1 |" in summary


def test_a_damaged_range_test_file_is_left_out_with_a_warning(tmp_path, caplog):
    _write_run(tmp_path)
    (tmp_path / RANGE_TEST_FILE).write_text(json.dumps({"step": 15, "curve": [[1.0, 2.0]], "denoised": [],
                                                        "suggested_gain": 2.0, "chosen_gain": "x3",
                                                        "base_lrs": [1e-3]}), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="hf_r8.ui.report"):
        written = write_report(tmp_path)
    assert "range_test.png" not in {path.name for path in written}
    assert caplog.records[-1].getMessage().endswith(f"{RANGE_TEST_FILE}: chosen_gain must be a number")


def test_a_range_test_record_is_plotted(tmp_path):
    _write_run(tmp_path)
    curve = [[0.01 * 10 ** (i / 3), 3.0 - 0.1 * i] for i in range(12)]
    (tmp_path / RANGE_TEST_FILE).write_text(json.dumps({"step": 12, "curve": curve, "denoised": curve[1:-1],
                                                        "suggested_gain": 5.0, "chosen_gain": 5.0,
                                                        "base_lrs": [1e-3]}), encoding="utf-8")
    written = write_report(tmp_path)
    assert (tmp_path / REPORT_DIR / "range_test.png") in written
    assert "LR range test: 12 steps, LR set 0.001, suggested 0.005, chosen 0.005." in written[-1].read_text()


def _a_file(folder: Path) -> Path:
    (folder / "file").write_text("")
    return folder / "file"


def _no_metrics_row(folder: Path) -> Path:
    folder.mkdir()
    (folder / METRICS_FILE).write_bytes(b'[1, 2]\n{"step": "7"}\n')
    return folder


def _report_path_is_a_file(folder: Path) -> Path:
    _write_run(folder / "r8")
    (folder / "r8" / REPORT_DIR).write_text("not a folder")
    return folder


@pytest.mark.parametrize(("make", "error", "message"), [
    (lambda tmp: tmp / "missing", FileNotFoundError, "missing: no such folder"),
    (_a_file, NotADirectoryError, "file: a file, not a folder"),
    (lambda tmp: tmp, FileNotFoundError, f"no {METRICS_FILE} in it or in"),
    (lambda tmp: _no_metrics_row(tmp / "run"), ValueError, "no well-formed rows, nothing to report"),
    (lambda tmp: _report_path_is_a_file(tmp / "run"), FileExistsError, "exists and is not a folder"),
], ids=["missing", "a file", "no run files", "no metrics row", "r8_report is a file"])
def test_what_cannot_be_reported_raises_an_error_that_says_why(tmp_path, make, error, message):
    with pytest.raises(error, match=message):
        write_report(make(tmp_path))


def test_a_report_leaves_pyplot_and_the_matplotlib_backend_alone(tmp_path):
    _write_run(tmp_path)
    # A fresh interpreter: the test session may have imported pyplot already.
    script = textwrap.dedent(f"""
        import sys
        import matplotlib
        matplotlib.use("svg")  # a notebook's backend stands in: any but Agg, and headless
        from hf_r8.ui.report import write_report
        write_report({str(tmp_path)!r})
        assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
        print(matplotlib.get_backend())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "svg"
    assert (tmp_path / REPORT_DIR / "loss.png").stat().st_size > 0


def test_a_decision_applied_to_several_parameter_groups_counts_once(tmp_path):
    folder = tmp_path / "r8"
    folder.mkdir()
    (folder / "r8_metrics.jsonl").write_text("".join(json.dumps({"step": step, "loss": 1.0}) + "\n"
                                                     for step in range(1, 11)))
    # Two increases on a model with the usual two groups (decay / no decay): four rows, two decisions.
    events = [{"step": step, "kind": "decision/increase", "group": group} for step in (3, 7) for group in (0, 1)]
    (folder / "r8_events.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))
    write_report(tmp_path)
    assert "| decision/increase | 2 |" in (folder / "r8_report" / "summary.md").read_text()
