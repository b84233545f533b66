"""The control layer is pure Python (docs/architecture.md): with HF_R8_BLOCK_FRAMEWORKS=1, as
`tests/test_layers.py` runs these tests, importing torch, transformers or any other framework fails here.
In a full run the other layers' tests have loaded them already, and nothing is blocked."""

from __future__ import annotations

import os
import sys

BLOCKED = ("torch", "transformers", "trl", "accelerate", "rich", "psutil", "matplotlib", "datasets")

if os.environ.get("HF_R8_BLOCK_FRAMEWORKS") == "1":
    for name in BLOCKED:
        sys.modules[name] = None  # `import torch` now raises ImportError
