"""Command-line entry points (console scripts declared in setup.cfg)."""
