"""The whole performance suite in one command, on any device, writing one report.

    python -m benchmarks.suite --device cuda --precision bf16-mixed     # on a GPU box
    python -m benchmarks.suite --quick                                  # a short CPU pass (minutes), to try it
    python -m benchmarks.suite --cpu 1 --out benchmarks/results       # the CPU tables of docs/performance.md

Runs ``overhead`` (framework overhead and the fast defaults' speed-up), ``startup``, ``method_cost``,
``speed_options`` and ``scaling`` with the same ``--device`` and ``--precision``, each writing its own tables into
``--out`` (default ``benchmarks/results/suite_<device>_<precision>/``), then ``performance_suite.md`` there: the
machine (torch, CUDA, GPU name, CPU count), the command lines, and every table in order. A benchmark that fails is
reported with its error and the suite goes on. The quality benchmarks (corruption stage, domain transfer) take
``--device`` and ``--precision`` too but run for hours; they are not part of the suite.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.perf import REPO, add_device_arguments

#: (benchmark module, its output name, extra arguments of the full run, extra arguments of --quick)
BENCHMARKS = [
    ("benchmarks.overhead", "overhead", [], ["--steps", "30", "--warmup", "5", "--memory-steps", "5"]),
    ("benchmarks.startup", "startup", [], ["--rounds", "2"]),
    ("benchmarks.method_cost", "method_cost", ["--rounds", "5"],
     ["--steps", "5", "--warmup", "2", "--rounds", "1", "--images", "2"]),
    ("benchmarks.speed_options", "speed_options", [], ["--steps", "5", "--warmup", "2", "--only", "fused AdamW"]),
    ("benchmarks.scaling", "scaling", [], ["--steps", "3", "--warmup", "1", "--batch-sizes", "4", "--counts", "8"]),
]  # fmt: skip


def machine(device: str) -> list[str]:
    import torch

    lines = [f"- torch {torch.__version__}, Python {platform.python_version()}, {os.cpu_count()} CPU cores "
             f"({platform.processor() or platform.machine()})"]  # fmt: skip
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        lines.append(f"- GPU {index}: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
                     f"capability {props.major}.{props.minor}")  # fmt: skip
    elif device.startswith("cuda"):
        lines.append("- CUDA requested but torch sees no GPU: the benchmarks below failed or ran nowhere")
    return lines


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="a few steps of each benchmark (to try the suite)")
    parser.add_argument("--only", nargs="*", default=None, help="benchmark names to run (default: all)")
    parser.add_argument("--cpu", type=int, default=None, help="pin every benchmark and its workers to this core")
    parser.add_argument("--out", default=None, help="folder of the tables and performance_suite.md")
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else list(argv)
    tag = f"{args.device.replace(':', '')}_{args.precision}" + ("_quick" if args.quick else "")
    out = Path(args.out or REPO / "benchmarks" / "results" / f"suite_{tag}")
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for module, name, full, quick in BENCHMARKS:
        if args.only and name not in args.only:
            # Not rerun now: the report still gathers its tables in --out, said to come from an earlier run.
            tables = sorted(out.glob(f"{name}*.md"))
            if tables:
                when = time.strftime("%Y-%m-%d %H:%M", time.localtime(max(t.stat().st_mtime for t in tables)))
                body = "\n\n".join(t.read_text().strip() for t in tables)
                sections.append(f"## {name}\n\n(not rerun by this command: the tables in {out} written {when})\n\n"
                                f"{body}\n")  # fmt: skip
            continue
        command = [sys.executable, "-m", module, "--device", args.device, "--precision", args.precision,
                   "--out", str(out / name), *(quick if args.quick else full)]  # fmt: skip
        if args.cpu is not None:
            command = ["taskset", "-c", str(args.cpu), *command, "--cpu", str(args.cpu)]
        shown = " ".join("python" if part == sys.executable else part for part in command)
        print(f"suite: {shown}", flush=True)
        start = time.time()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        took = time.time() - start
        tables = sorted(out.glob(f"{name}*.md"))
        if done.returncode != 0:
            body = f"FAILED after {took:.0f} s:\n\n```\n{done.stderr[-2000:]}\n```"
        else:
            body = "\n\n".join(t.read_text().strip() for t in tables) or "(no table written)"
        sections.append(f"## {name}\n\n`{shown}` ({took:.0f} s)\n\n{body}\n")
    report = out / "performance_suite.md"
    header = [f"# Performance suite: device {args.device}, precision {args.precision}"
              + (" (quick: a few steps each, not for conclusions)" if args.quick else ""), "",
              f"Written {time.strftime('%Y-%m-%d %H:%M')} by `python -m benchmarks.suite {' '.join(given)}`.", "",
              *machine(args.device),
              ""]  # fmt: skip
    report.write_text("\n".join(header) + "\n" + "\n".join(sections))
    print(f"suite: wrote {report}", flush=True)
    return report


if __name__ == "__main__":
    main()
