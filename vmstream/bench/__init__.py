"""Benchmarks of vmstream against QEMU's own restore and cold boots.

Only `vmstream.cli.bench` imports this package. Each bench returns a plain
dict (the JSON `--json` prints); `report` turns it into a markdown table and a plot.
"""
