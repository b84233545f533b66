"""The control law, pure Python: configuration, signals, rules, the decision engine, the controller, the
rollback policy and the LR range test. Nothing here imports torch or transformers (a test enforces it)."""
