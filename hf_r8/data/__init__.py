"""What R8 knows about each example and how it orders them: the loss catalog, its updates from the
device, the balanced sampler, per-example losses, and items that carry their index."""
