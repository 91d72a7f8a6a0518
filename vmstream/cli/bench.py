"""`vmstream bench ...`: benchmarks against baselines in the same run."""

from __future__ import annotations

import typer

bench_app = typer.Typer(help="Benchmarks: JSON, a plot and a markdown table per run.", no_args_is_help=True)
