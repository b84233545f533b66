#!/usr/bin/env bash
# R8Callback under Accelerate with several processes, on the stock Trainer example:
#
#     bash examples/accelerate_ddp.sh [--steps 40] [--preset conservative]     # 2 processes
#     NPROC=8 bash examples/accelerate_ddp.sh                                   # 8 GPUs
#     PORT=29600 bash examples/accelerate_ddp.sh                                # another rendezvous port
#
# On a CPU-only machine the processes talk over gloo, on GPUs over NCCL. Every process reduces the
# same signals and makes the same decisions; the dashboard and the run files come from the main
# process only.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec accelerate launch --multi_gpu --num_processes "${NPROC:-2}" --num_machines 1 --mixed_precision no \
    --main_process_port "${PORT:-29500}" \
    "$here/trainer_callback_only.py" "$@"
