"""R8Callback on TRL's RLOOTrainer (REINFORCE leave-one-out): `examples/trl_grpo.py` with `--trainer rloo`.

    python examples/trl_rloo.py [--steps 60] [--model gpt2] [--beta 0.04]
"""

from __future__ import annotations

from trl_grpo import main

if __name__ == "__main__":
    main(trainer_name="rloo")
