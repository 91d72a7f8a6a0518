"""The `vmstream` command: a thin client of the host agent, plus the demo."""
