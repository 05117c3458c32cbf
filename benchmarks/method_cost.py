"""Method cost: training step time and peak memory of every method relative to DreamBooth on the same model and
data, and the sampling cost of each method's export relative to the pretrained model.

Every method is built from its experiment file's ``model`` section and trained on the same data: the embedded
few-shot domain (``experiments/finetune_domain.yaml``'s data: 32x32, batch 16), so the ratios are the methods' own
extra work. DreamBooth's prior preservation row adds 16 class images to each batch (sampled once, in setup).
Each configuration runs in its own single-threaded process (``benchmarks/step_cost.py``).

    python -m benchmarks.method_cost                  # CPU; writes benchmarks/results/method_cost.{md,csv}
    python -m benchmarks.method_cost --device cuda    # the same on a GPU
"""

from __future__ import annotations

import argparse
import copy

from benchmarks.perf import add_device_arguments, ratio
from benchmarks.step_cost import load_experiment, measure_isolated
from benchmarks.tables import write_table

#: (row name, experiment whose model section is used, extra model init args)
METHODS = [
    ("DreamBooth (full)", "experiments/dreambooth.yaml", {}),
    ("DreamBooth + prior preservation", "experiments/dreambooth.yaml", {}),
    ("DreamBooth (full), twice the batch", "experiments/dreambooth.yaml", {}),  # what prior preservation's batch costs
    ("BNN (full)", "experiments/dreambooth_bnn.yaml", {}),
    ("DreamBooth LoRA r4", "experiments/dreambooth_lora.yaml", {}),
    ("BNN LoRA r4", "experiments/dreambooth_lora_bnn.yaml", {}),
    ("Diff-Tuning", "experiments/diff_tuning.yaml", {}),
    ("SDFT", "experiments/sdft.yaml", {}),
    ("A3FTA", "experiments/a3fta.yaml", {}),
    ("ANL condition tuning", "experiments/anl.yaml", {}),
]
REFERENCE = "DreamBooth (full)"


def spec_for(name: str, experiment: str, extra: dict, args) -> dict:
    model, _ = load_experiment(experiment)
    model = copy.deepcopy(model)
    model["init_args"].update(extra)
    _, data = load_experiment("experiments/finetune_domain.yaml")
    data = {**data, "batch_size": args.batch_size}
    if "prior preservation" in name:
        data.update(class_prompt="a red star on a gray background", num_class_images=args.batch_size)
    if "twice the batch" in name:
        data["batch_size"] = 2 * args.batch_size
    return {
        "model": model, "data": data, "device": args.device, "precision": args.precision, "steps": args.steps,
        "warmup": args.warmup,
        "inference": True, "inference_images": args.images, "inference_rounds": args.rounds,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_arguments(parser)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=8, help="images per sampling round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating sampling rounds (export, pretrained)")
    parser.add_argument("--only", nargs="*", default=None, help="row names to run (default: all)")
    parser.add_argument("--cpu", type=int, default=None, help="pin the workers to this core")
    parser.add_argument("--out", default="benchmarks/results/method_cost")
    args = parser.parse_args(argv)

    rows = []
    for name, experiment, extra in METHODS:
        if args.only and name not in args.only:
            continue
        result = measure_isolated(spec_for(name, experiment, extra, args), cpu=args.cpu)
        rows.append({"method": name, "experiment": experiment, **result})
        print(rows[-1], flush=True)
    reference = next((r for r in rows if r["method"] == REFERENCE), rows[0])
    for row in rows:
        row["step"] = f"{row['median_ms']:.0f} [{row['q1_ms']:.0f}-{row['q3_ms']:.0f}]"
        row["step_vs_dreambooth"] = ratio(row["median_ms"], reference["median_ms"])
        row["memory_vs_dreambooth"] = ratio(row["peak_mb"], reference["peak_mb"])
        row["sampling_vs_pretrained"] = ratio(row["sample_ms_per_image"], row["base_sample_ms_per_image"])
        extra_params = row["export_denoiser_params"] - row["base_denoiser_params"]
        row["export_extra_params"] = f"{extra_params:+,}"
        row["trainable"] = f"{row['trainable_params']:,}"
    bnn = next((r for r in rows if r["method"] == "BNN (full)"), None)
    goal = ""
    if bnn is not None:
        value = bnn["median_ms"] / reference["median_ms"]
        goal = f"BNN step time {value:.2f}x DreamBooth: goal <= 1.15x {'met' if value <= 1.15 else 'NOT met'}."
    sdft = next((r for r in rows if r["method"] == "SDFT"), None)
    if sdft is not None:
        value = sdft["median_ms"] / reference["median_ms"]
        goal += f" SDFT step time {value:.2f}x DreamBooth: goal <= 1.15x {'met' if value <= 1.15 else 'NOT met'}."
    columns = ["method", "trainable", "step", "step_vs_dreambooth", "peak_mb", "memory_vs_dreambooth", "setup_s",
               "sample_ms_per_image", "sampling_vs_pretrained", "export_extra_params"]  # fmt: skip
    notes = [
        f"Device {args.device}, precision {args.precision}, "
        f"one thread per process; {args.steps} timed steps after {args.warmup} warm-up, batch "
        f"{args.batch_size} at 32x32 (embedded domain, `experiments/finetune_domain.yaml`'s data). Step: median "
        "[interquartile range] ms per optimizer step. Peak: MiB above the worker's floor after imports (CPU: resident "
        "set high-water; CUDA: max allocated). Setup: seconds before the first step (class images, memory bank, "
        "reference statistics). Sampling: median over "
        f"{args.rounds} alternating rounds of {args.images} images, 25 DDIM steps with guidance, of the export "
        "loaded back (plain `DiffusionBase` unless the method inserts modules) vs the pretrained model.",
        goal,
    ]
    write_table(rows, args.out, "Method cost relative to DreamBooth", columns, notes)
    return rows


if __name__ == "__main__":
    main()
