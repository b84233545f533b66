"""What the user sees: the live dashboard, the run files on disk and the end-of-run report."""
