"""Speed options, each measured off and on: cached latents and text embeddings, SDPA attention, channels-last,
gradient checkpointing (memory vs time), torch.compile, bf16 mixed precision.

DreamBooth (``experiments/dreambooth.yaml``'s model, full fine-tuning) on the embedded domain at 32x32, batch 16.
Each option is toggled alone from the default configuration, off then on, each run in its own single-threaded
process (``benchmarks/step_cost.py``), so that its peak memory is its own.

    python -m benchmarks.speed_options                 # writes benchmarks/results/speed_options.{md,csv}
    python -m benchmarks.speed_options --device cuda   # the same on a GPU (try 16-mixed there)
"""

from __future__ import annotations

import argparse
import copy

from benchmarks.perf import add_device_arguments, ratio
from benchmarks.step_cost import load_experiment, measure_isolated
from benchmarks.tables import write_table

#: option name -> (model args or precision when off, when on)
OPTIONS = {
    "cached text embeddings": ({"cache_text_embeddings": False}, {"cache_text_embeddings": True}),
    "cached latents": ({"cache_latents": False}, {"cache_latents": True}),
    "fused AdamW": ({"fused_adamw": False}, {"fused_adamw": True}),
    "SDPA attention (vs eager)": ({"attention": "eager"}, {"attention": "sdpa"}),
    "channels_last": ({"channels_last": False}, {"channels_last": True}),
    "gradient checkpointing": ({"gradient_checkpointing": False}, {"gradient_checkpointing": True}),
    "torch.compile": ({"compile": False}, {"compile": True}),
    "bf16-mixed precision": ({"precision": "32-true"}, {"precision": "bf16-mixed"}),
}


def spec_for(setting: dict, args) -> dict:
    model, _ = load_experiment("experiments/dreambooth.yaml")
    model = copy.deepcopy(model)
    setting = dict(setting)
    precision = setting.pop("precision", args.precision)
    model["init_args"].update(setting)
    _, data = load_experiment("experiments/finetune_domain.yaml")
    return {"model": model, "data": {**data, "batch_size": args.batch_size}, "device": args.device,
            "precision": precision, "steps": args.steps, "warmup": args.warmup}  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_arguments(parser)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--only", nargs="*", default=None, help="option names to run (default: all)")
    parser.add_argument("--cpu", type=int, default=None, help="pin the workers to this core")
    parser.add_argument("--out", default="benchmarks/results/speed_options")
    args = parser.parse_args(argv)

    rows = []
    for name, (off, on) in OPTIONS.items():
        if args.only and name not in args.only:
            continue
        a = measure_isolated(spec_for(off, args), cpu=args.cpu)
        b = measure_isolated(spec_for(on, args), cpu=args.cpu)
        rows.append({
            "option": name,
            "off_step_ms": a["median_ms"], "on_step_ms": b["median_ms"],
            "speedup": ratio(a["median_ms"], b["median_ms"]),
            "off_peak_mb": a["peak_mb"], "on_peak_mb": b["peak_mb"],
            "memory_on_vs_off": ratio(b["peak_mb"], a["peak_mb"]),
            "off_first_step_s": a["first_step_s"], "on_first_step_s": b["first_step_s"],
            "off_iqr_ms": f"{a['q1_ms']:.0f}-{a['q3_ms']:.0f}", "on_iqr_ms": f"{b['q1_ms']:.0f}-{b['q3_ms']:.0f}",
        })  # fmt: skip
        print(rows[-1], flush=True)
    columns = ["option", "off_step_ms", "on_step_ms", "speedup", "off_peak_mb", "on_peak_mb", "memory_on_vs_off",
               "on_first_step_s"]  # fmt: skip
    notes = [
        f"Device {args.device}, precision {args.precision} (but the bf16 row), "
        f"one thread per process; DreamBooth full fine-tuning, batch {args.batch_size} at 32x32, "
        f"median of {args.steps} steps after {args.warmup} warm-up (interquartile ranges in the CSV). Speed-up = off / "
        "on step time (>1: the option is faster). Peak: MiB above the worker's floor after imports (CPU: resident set "
        "high-water; CUDA: max allocated). First step: seconds of the first step with the option on (compilation).",
    ]
    write_table(rows, args.out, "Speed options, each off and on", columns, notes)
    return rows


if __name__ == "__main__":
    main()
