"""The adapters: R8Callback and R8Trainer for transformers (and TRL), AdaptiveScheduler for a torch
scheduler slot, R8Loop for a plain loop. They translate their host's events into the control layer's calls."""
