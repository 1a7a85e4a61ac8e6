"""Every representation on every task, one table per task (issue 7), produced by one command in one run.

A thin wrapper over :func:`slicefield.benchmark_all.run_table` (what ``slicefield benchmark --methods all`` runs;
its module docstring says what the truth, the tasks, the rows and the columns are), printing each table as its task
ends and writing the rows, machine and command as JSON.

Usage (about 25 minutes on the shared 2-core CPU)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/representations_table.py ../shared/data/ch2bet.nii.gz \
        --json benchmarks/results/representations_table.json

The same tables from the command line::

    slicefield benchmark ../shared/data/ch2bet.nii.gz --methods all --tasks stacks,views --json table.json

``--budget S`` sets the time budget of every fitted representation (default 45 s, chosen so that the whole run
fits in about 25 minutes); ``--tasks stacks`` or ``--tasks views`` runs one task; ``--quick`` is a smoke run (a
48^3 crop at 4 mm, 5 s budgets unless ``--budget`` is given, small view renders).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from slicefield.benchmark_all import QUICK, TableConfig, TableResult, format_task, run_table
from slicefield.io import load_volume
from slicefield.runs import to_jsonable


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("volume", help="the truth (1 mm NIfTI), e.g. ../shared/data/ch2bet.nii.gz")
    ap.add_argument("--budget", type=float, help="time budget of every fitted representation, s (default 45)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 48^3 crop at 4 mm, 5 s budgets, small views")
    ap.add_argument("--json", help="write rows, machine and command here (after every task)")
    ap.add_argument("--tasks", default="stacks,views", help="comma-separated subset of stacks,views")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    config = QUICK if args.quick else TableConfig()
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    config = replace(config, tasks=tasks, budget_s=config.budget_s if args.budget is None else args.budget)
    env = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }

    def record(task: str, rows: list[dict], result: TableResult) -> None:
        print(format_task(task, rows), flush=True)
        if args.json:
            env_now = {**env, "load_avg": os.getloadavg(), "utc": datetime.now(UTC).isoformat(timespec="seconds")}
            doc = {
                "command": sys.argv,
                **result.to_json(),
                "total_s": time.perf_counter() - start,
                "environment": env_now,
            }
            Path(args.json).write_text(json.dumps(to_jsonable(doc), indent=1) + "\n")

    run_table(load_volume(args.volume), config=config, on_table=record)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
