"""The end of every multi-process test script: each rank writes what it saw, then the group closes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist


def write_rank_result(output_dir: str, result: dict[str, Any]) -> None:
    """OUTPUT_DIR/rank<k>.json for the test to compare, once every rank has written its own."""
    Path(output_dir, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()  # both ranks have written their results
    dist.destroy_process_group()  # a gloo group left open can abort the interpreter at exit
