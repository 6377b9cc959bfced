"""Convert a public request log into the bench's trace format: CSV ``t,rps``, one row a second.

Usage: python hack/convert_trace.py SOURCE --scale K --out bench/traces/NAME.csv

SOURCE is one of the formats the public traces ship in:
- CSV with a ``TIMESTAMP`` column of wall-clock times (Azure LLM inference traces);
- JSON lines with a ``timestamp`` in milliseconds from the start (Mooncake traces).
Each request is counted in the second it arrived, from the first request on, and the count
multiplied by ``--scale``: the simulator draws Poisson arrivals at that rate within the second,
so the trace's burstiness at one second and above is kept while its mean reaches the range
our profiles serve.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from datetime import datetime
from pathlib import Path

import numpy as np


def arrival_seconds(path: Path) -> np.ndarray:
    """Seconds from the first request, ascending."""
    if path.suffix == ".jsonl":
        with path.open() as f:
            t = np.array([json.loads(line)["timestamp"] / 1000 for line in f if line.strip()])
    else:
        with path.open(newline="") as f:
            # Azure writes 7 fractional digits; fromisoformat takes at most 6.
            stamps = [datetime.fromisoformat(r["TIMESTAMP"][:26]) for r in csv.DictReader(f)]
        t = np.array([(s - stamps[0]).total_seconds() for s in stamps])
    t = np.sort(t)
    return t - t[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("source", type=Path)
    parser.add_argument("--scale", type=float, required=True, help="requests/s per logged request")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    t = arrival_seconds(args.source)
    counts = np.bincount(t.astype(np.int64))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t", "rps"])
        for s, c in enumerate(counts):
            w.writerow([s, f"{c * args.scale:g}"])
    rps = counts * args.scale
    print(
        f"{args.out}: {len(t)} requests over {len(counts)} s; x{args.scale:g}: mean "
        f"{rps.mean():.1f} rps, peak second {rps.max():g} rps, "
        f"index of dispersion (1 s) {counts.var() / counts.mean():.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
