"""Run configs: the defaults, loading files and overrides, and the one validation."""
