"""Outputs of a bench: JSON, a markdown table and a PNG plot per bench.

matplotlib is imported lazily with the Agg backend: benches run headless and
the CLI must not pay for the import when it only prints help.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmstream.bench.common import say


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; the first column left-aligned, the others right."""
    align = ["---"] + ["--:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"


def fmt_mib(v: float | None) -> str:
    return "-" if v is None else f"{v / (1 << 20):.1f} MiB"


def fmt_x(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}x"


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_outputs(out: Path, name: str, result: dict[str, Any], markdown: str, fig: Any) -> dict[str, str]:
    """Write NAME.json, NAME.md and NAME.png into out; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "markdown": out / f"{name}.md", "plot": out / f"{name}.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["markdown"].write_text(markdown)
    fig.tight_layout()
    fig.savefig(paths["plot"], dpi=110)
    pyplot().close(fig)
    say(f"wrote {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return {k: str(v) for k, v in paths.items()}


def command_line() -> str:
    """The command as typed, with the environment that changes what it measures."""
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ("VMSTREAM_HOME", "VMSTREAM_ACCEL", "PYTHONPATH") if k in os.environ]
    return " ".join([*env, "vmstream", *map(shlex.quote, sys.argv[1:])])


def run_and_write(bench_module: Any, bench: Any, out: Path, output_name: str | None = None, **kw: Any) -> dict[str, Any]:
    """Run one bench module (its run() and render()) and write its JSON, table and plot
    as output_name.* (default: the module's name)."""
    res: dict[str, Any] = bench_module.run(bench, **kw)
    res.setdefault("command", command_line())
    md, fig = bench_module.render(res)
    res["files"] = write_outputs(out, output_name or bench_module.__name__.rsplit(".", 1)[-1], res, md, fig)
    return res
