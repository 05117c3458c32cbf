"""Scaling of cost with work: training step time and memory vs resolution and batch size, and the time to sample
class images (guidance 2) and a Diff-Tuning memory bank (guidance 1) vs their count.

    python -m benchmarks.scaling                 # writes benchmarks/results/scaling_{steps,sampling}.{md,csv}
    python -m benchmarks.scaling --device cuda
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

from benchmarks.perf import add_device_arguments, now, run_worker
from benchmarks.step_cost import load_experiment, measure_isolated
from benchmarks.tables import write_table


def step_rows(args) -> list[dict]:
    model, _ = load_experiment("experiments/dreambooth.yaml")
    _, data = load_experiment("experiments/finetune_domain.yaml")
    rows = []
    for resolution in args.resolutions:
        for batch_size in args.batch_sizes:
            spec = {"model": copy.deepcopy(model), "data": {**data, "resolution": resolution, "batch_size": batch_size},
                    "device": args.device, "precision": args.precision, "steps": args.steps,
                    "warmup": args.warmup}  # fmt: skip
            result = measure_isolated(spec, cpu=args.cpu)
            rows.append({"resolution": resolution, "batch_size": batch_size, **result,
                         "ms_per_image": round(result["median_ms"] / batch_size, 2)})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def sampling_rows(spec: dict) -> list[dict]:
    """Worker: time class-image and memory-bank generation (written to a temporary folder) for each count."""
    from lightning_ft.core.families.inputs import SampleInputs
    from lightning_ft.data.class_images import generate_class_images
    from lightning_ft.data.memory_bank import generate_memory_bank
    from lightning_ft.methods import DreamBooth

    device = spec["device"]
    module = DreamBooth(pretrained=spec["pretrained"], guidance_scale=2.0).to(device)
    prompt = "a orange star on a gray background"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        module.generate(prompts=[prompt], seeds=[0], steps=2)  # warm-up
        for count in spec["counts"]:
            start = now(device)
            generate_class_images(module, SampleInputs.of(prompts=[prompt] * count), Path(tmp) / f"class_{count}")
            class_s = now(device) - start
            start = now(device)
            generate_memory_bank(module, Path(tmp) / f"bank_{count}", SampleInputs.of(prompts=[""] * count),
                                 steps=25, guidance_scale=1.0)  # fmt: skip
            bank_s = now(device) - start
            rows.append({"count": count, "class_images_s": round(class_s, 2), "memory_bank_s": round(bank_s, 2),
                         "class_ms_per_image": round(1000 * class_s / count, 1),
                         "bank_ms_per_image": round(1000 * bank_s / count, 1)})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_arguments(parser)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--counts", type=int, nargs="+", default=[8, 32, 96])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cpu", type=int, default=None, help="pin the workers to this core")
    parser.add_argument("--out", default="benchmarks/results/scaling")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import json

        print(json.dumps(sampling_rows(json.loads(args.worker))))
        return

    rows = step_rows(args)
    write_table(rows, f"{args.out}_steps", "Step time and memory vs resolution and batch size",
                ["resolution", "batch_size", "median_ms", "ms_per_image", "peak_mb"],
                [f"Device {args.device}, precision {args.precision}, "
                 f"one thread per process; DreamBooth full fine-tuning of the embedded model on "
                 f"the embedded domain; median of {args.steps} steps after {args.warmup} warm-up. Peak: MiB above the "
                 "worker's floor after imports. 64x64 runs the 32x32-native model at twice the size."])  # fmt: skip
    from lightning_ft.embedded import asset_path

    spec = {"device": args.device, "pretrained": str(asset_path("shapes-t2i")), "counts": args.counts}
    sampled = run_worker("benchmarks.scaling", spec, cpu=args.cpu)
    write_table(sampled, f"{args.out}_sampling", "Class-image and memory-bank generation time vs count",
                ["count", "class_images_s", "class_ms_per_image", "memory_bank_s", "bank_ms_per_image"],
                [f"Device {args.device}, one thread; the embedded model, 25 DDIM steps, batches of 16; class images "
                 "with guidance 2 (two denoiser passes per step), the memory bank with guidance 1 (one pass), as in "
                 "the experiments. One run per count."])  # fmt: skip


if __name__ == "__main__":
    main()
