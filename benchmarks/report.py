"""pytest-benchmark's JSON -> a markdown table and, where matplotlib is installed, a plot.

Usage:
    pytest benchmarks/ --benchmark-only --benchmark-json=results.json
    python -m benchmarks.report results.json --out DIR      # DIR/benchmarks.md, DIR/benchmarks.png

One row per variant and size: the median, the GB/s at the median (extra_info's bytes_moved: the bytes
the step must move, not what each variant moves) and the median over the copy floor measured in the
same run at the same size. The plot shows time and GB/s per variant, one panel row per size, with the
copy floor drawn in.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from .utils import COPY_LABEL

MARKDOWN_NAME, PLOT_NAME = "benchmarks.md", "benchmarks.png"


@dataclass
class Row:
    group: str  # "<device> <size>", as the benchmarks set it
    variant: str
    median_s: float
    bytes_moved: int | None
    device_name: str | None

    @property
    def gb_per_s(self) -> float:
        return self.bytes_moved / self.median_s / 1e9 if self.bytes_moved else math.nan


def load(path) -> tuple[list[Row], dict]:
    """The timed benchmarks of a --benchmark-json file (untimed ones have no stats), and its machine_info."""
    data = json.loads(Path(path).read_text())
    rows = []
    for bench in data.get("benchmarks", []):
        stats, extra = bench.get("stats") or {}, bench.get("extra_info") or {}
        if "median" not in stats:
            continue
        rows.append(Row(group=bench.get("group") or extra.get("size") or "",
                        variant=extra.get("variant", bench["name"]), median_s=stats["median"],
                        bytes_moved=extra.get("bytes_moved"), device_name=extra.get("device")))
    return rows, data.get("machine_info") or {}


def _by_group(rows: list[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    return {group: sorted(members, key=lambda r: r.median_s) for group, members in groups.items()}


def _copy_floor(members: list[Row]) -> Row | None:
    return next((r for r in members if r.variant == COPY_LABEL), None)


def _machine(rows: list[Row], machine_info: dict) -> str:
    names = sorted({r.device_name for r in rows if r.device_name})
    cpu = (machine_info.get("cpu") or {}).get("brand_raw")
    node = machine_info.get("node")
    name = ", ".join(names or ([cpu] if cpu else [])) or "an unnamed machine"
    return name + (f" (host {node})" if node else "")


def markdown(rows: list[Row], machine_info: dict | None = None, plot_name: str | None = None) -> str:
    lines = [f"Measured on {_machine(rows, machine_info or {})}.", ""]
    if plot_name:
        lines += [f"![time and GB/s per variant]({plot_name})", ""]
    lines += ["| variant | size | median ms | GB/s | / copy floor |", "| --- | --- | ---: | ---: | ---: |"]
    for group, members in _by_group(rows).items():
        floor = _copy_floor(members)
        for r in members:
            gb = "–" if math.isnan(r.gb_per_s) else f"{r.gb_per_s:.2f}"
            ratio = f"{r.median_s / floor.median_s:.2f}x" if floor else "–"
            lines.append(f"| {r.variant} | {group} | {r.median_s * 1e3:.3f} | {gb} | {ratio} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path) -> bool:
    """Writes the plot to path; False (nothing written) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = _by_group(rows)
    height = sum(0.3 * len(m) + 1.0 for m in groups.values())
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, max(height, 2.5)), squeeze=False,
                             gridspec_kw={"height_ratios": [len(m) + 2 for m in groups.values()]})
    for (group, members), (ax_time, ax_gb) in zip(groups.items(), axes):
        labels = [r.variant for r in members]
        ax_time.barh(labels, [r.median_s * 1e3 for r in members], color="tab:blue")
        ax_time.set_xscale("log")
        ax_time.set_xlabel("median ms (log)")
        ax_time.set_title(group, loc="left")
        ax_time.invert_yaxis()
        ax_gb.barh(labels, [0 if math.isnan(r.gb_per_s) else r.gb_per_s for r in members], color="tab:green")
        ax_gb.set_xlabel("GB/s at the median")
        ax_gb.set_yticks(range(len(labels)), [""] * len(labels))
        ax_gb.invert_yaxis()
        floor = _copy_floor(members)
        if floor:
            ax_time.axvline(floor.median_s * 1e3, color="tab:red", linestyle="--", label="copy floor")
            ax_gb.axvline(floor.gb_per_s, color="tab:red", linestyle="--", label="copy floor")
            ax_gb.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    parser.add_argument("json", help="the file of pytest --benchmark-json=FILE")
    parser.add_argument("--out", default=".", help="folder for benchmarks.md and benchmarks.png (default: .)")
    args = parser.parse_args(argv)
    rows, machine_info = load(args.json)
    if not rows:
        print(f"{args.json} holds no timed benchmarks (was it written with --benchmark-disable?)", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plotted = plot(rows, out / PLOT_NAME)
    (out / MARKDOWN_NAME).write_text(markdown(rows, machine_info, PLOT_NAME if plotted else None))
    print(f"wrote {out / MARKDOWN_NAME}")
    print(f"wrote {out / PLOT_NAME}" if plotted else
          "plot skipped: matplotlib is not installed (pip install matplotlib)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
