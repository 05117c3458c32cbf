"""``python -m lightning_ft.report RUN_DIR [RUN_DIR ...]``: the report of one run, or a comparison of several.

Each RUN_DIR is a run folder (``runs/<name>/lightning_logs/version_N``) or a folder above run folders (every run
under it is taken: ``runs/<name>`` for all its versions, a sweep's folder for all its runs). One run in all: its
``report.html`` is written into it. Several, or ``--compare``: ``comparison.html`` in ``--out`` (default
``comparison/`` in the runs' common folder), with a ranked table (``--rank`` picks the column).
"""

from __future__ import annotations

import argparse
import sys

from lightning_ft.report.compare import RANKINGS, write_comparison
from lightning_ft.report.run_folder import find_runs
from lightning_ft.report.run_report import write_run_report


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lightning_ft.report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, or folders above them")
    parser.add_argument("--compare", action="store_true", help="write a comparison even for a single run")
    parser.add_argument("--out", default=None, help="folder of the comparison (default: comparison/ in the runs' "
                        "common folder)")  # fmt: skip
    parser.add_argument("--rank", default=None, choices=sorted(RANKINGS),
                        help="ranking column of the comparison (default: final FID when every run has one, else "
                        "the corruption monitor's progress at its recommended step)")  # fmt: skip
    parser.add_argument("--max-grids", type=int, default=4, help="sample grids in a run report (default 4)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        runs = [run for path in args.runs for run in find_runs(path)]
        runs = list(dict.fromkeys(runs))
        if len(runs) == 1 and not args.compare:
            print(f"lightning-ft: run report written to {write_run_report(runs[0], args.max_grids)}")
        else:
            page = write_comparison(runs, args.out, args.rank)
            print(f"lightning-ft: comparison of {len(runs)} runs written to {page}")
    except (FileNotFoundError, ValueError) as error:
        print(f"lightning-ft report: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
