"""Joins the summary.md of every benchmark directory under DIR into one page."""

import json
import sys
from pathlib import Path


def main(root):
    root = Path(root)
    parts = ["# arbor benchmark results", "",
             "Produced by `deploy/bench/suite` (each section's command is listed with it).",
             "Wall time, CPU and WAN bytes are medians of interleaved runs; ratios compare",
             "medians of wall time. Raw runs: `*/runs.jsonl`; charts: `*/chart.png`.", ""]
    for summary in sorted(root.glob("*/summary.json")):
        s = json.loads(summary.read_text())
        parts.append((summary.parent / "summary.md").read_text())
        parts.append(f"Command: `{s['config']['command']}`  ")
        parts.append(f"Chart: [{summary.parent.name}/chart.png]({summary.parent.name}/chart.png)\n")
    for startup in sorted(root.glob("startup*.md")):
        parts.append(startup.read_text())
    print("\n".join(parts))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "results")
