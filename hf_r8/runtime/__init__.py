"""What touches tensors and processes: snapshots, host copies, collectives, parameter groups, dither,
freezing and MoE router groups."""
