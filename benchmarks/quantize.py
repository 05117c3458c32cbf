"""A quantised frozen base (``model.quantize``): weight memory, step time and loss of a LoRA over int8 / fp8 / nf4
weights against the same LoRA over the unquantised base.

Two embedded models, both shipped with the package: ``shapes-t2i`` (a text-to-image UNet: its linear layers, which
torchao quantises, hold 39% of the denoiser's weights, the convolutions the rest) and ``shapes-dit`` (a class-
conditional DiT: 97% of its weights are linear). Each is built once per ``quantize`` value with
``DiffusionBase(trainable='lora')`` (rank 4 on the attention q/k/v/out projections, the default). For each:

- **memory**: the bytes of the frozen denoiser's parameters and buffers (the LoRA's own weights left out), a
  quantised tensor counted by the tensors it stores (``lightning_ft.core.quantize.weight_bytes``); and of the frozen
  text encoder;
- **loss**: the plain denoising loss on one batch of the embedded world's images (their captions, or class labels),
  with the same noise, timesteps and latent draws for every variant (seeded per draw), at initialisation (LoRA up
  matrix zero: the base model's loss), against the unquantised model's: mean absolute and relative difference and the
  largest relative difference over the draws;
- **step time**: one training step (loss, backward, AdamW on the LoRA) on the same batch, the variants of a model
  interleaved step by step in one process so that they share the machine's state; median and interquartile range.

    python -m benchmarks.quantize --cpu 1      # writes benchmarks/results/quantize.{md,csv}
    python -m benchmarks.quantize --device cuda --precision bf16-mixed

A format that cannot run on the device at the precision (``lightning_ft.core.quantize.check_fit``, as fit start
refuses it: fp8 at ``bf16-true``) gets a row with the refusal instead of numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics

import torch

from benchmarks.perf import add_device_arguments, now, ratio
from benchmarks.tables import write_table
from lightning_ft.core import quantize as q

MODELS = {"shapes-t2i": "text-to-image UNet", "shapes-dit": "class-conditional DiT"}
MODES = ("none", "int8", "fp8", "nf4")  # by bits per weight


def make_batch(model: str, size: int, resolution: int = 32) -> dict:
    """``size`` images of the embedded world with their captions (text-to-image) or class labels (DiT)."""
    from lightning_ft.embedded import shapes

    specs = [shapes.spec_for_index(0, i) for i in range(size)]
    pixels = torch.stack([torch.from_numpy(shapes.render(s, resolution)).permute(2, 0, 1) for s in specs])
    batch = {"pixel_values": pixels.float() / 127.5 - 1}
    if model == "shapes-dit":
        batch["class_labels"] = torch.tensor([shapes.class_label(s) for s in specs])
    else:
        batch["prompts"] = [s.caption for s in specs]
    return batch


def build(model: str, mode: str, device: str, precision: str):
    """The module of ``model`` with ``quantize=mode`` on ``device``, cast as ``precision`` casts it; a string (the
    refusal) when the format cannot run there at that precision, as fit start refuses it."""
    from lightning_ft.core.base import DiffusionBase
    from lightning_ft.embedded import asset_path

    try:
        q.check_fit(mode, device, precision)
    except RuntimeError as error:
        return str(error)
    torch.manual_seed(0)  # the same LoRA initialisation for every variant
    module = DiffusionBase(pretrained=str(asset_path(model)), trainable="lora", quantize=mode, lr=1e-4)
    return module.to(device, q.PRECISION_DTYPES[precision][0]).train()


def autocast(device: str, precision: str):
    dtype = q.PRECISION_DTYPES[precision][1]
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


def frozen_bytes(module: torch.nn.Module) -> int:
    """``weight_bytes`` of ``module`` without the LoRA's own (trainable) weights."""
    lora = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    return q.weight_bytes(module) - lora


def losses(module, batch: dict, draws: int, cast) -> list[float]:
    values = []
    for seed in range(draws):
        torch.manual_seed(1000 + seed)  # noise, timesteps and latents: the same draws for every variant
        with torch.no_grad(), cast():
            values.append(module.training_loss(batch)[0].float().item())
    return values


def measure_model(model: str, args) -> list[dict]:
    batch = make_batch(model, args.batch_size)
    dtype = q.PRECISION_DTYPES[args.precision][0]
    batch = {k: v.to(args.device, dtype if v.is_floating_point() else None) if torch.is_tensor(v) else v
             for k, v in batch.items()}  # fmt: skip
    built = {mode: build(model, mode, args.device, args.precision) for mode in MODES}
    refused = {mode: why for mode, why in built.items() if isinstance(why, str)}
    modules = {mode: module for mode, module in built.items() if mode not in refused}
    cast = functools.partial(autocast, args.device, args.precision)
    measured = {mode: losses(module, batch, args.draws, cast) for mode, module in modules.items()}
    optimizers = {mode: module.configure_optimizers()["optimizer"] for mode, module in modules.items()}
    times = {mode: [] for mode in MODES}
    order = list(modules)
    for step in range(args.warmup + args.steps):
        # Interleaved, in a rotating order: every variant sees the same machine state, none always runs first.
        for mode in order[step % len(order) :] + order[: step % len(order)]:
            module = modules[mode]
            start = now(args.device)
            with cast():
                loss, _ = module.training_loss(batch)
            loss.backward()
            optimizers[mode].step()
            optimizers[mode].zero_grad()
            if step >= args.warmup:
                times[mode].append(now(args.device) - start)
    rows = [{"model": model, "quantize": mode, "refused": why} for mode, why in refused.items()]
    reference = torch.tensor(measured["none"])
    base_bytes = frozen_bytes(modules["none"].denoiser)
    for mode, module in modules.items():
        got = torch.tensor(measured[mode])
        diff = (got - reference).abs()
        quartiles = statistics.quantiles(times[mode], n=4)
        # Paired by round: this variant's step over the unquantised model's step of the same round.
        paired = statistics.quantiles([a / b for a, b in zip(times[mode], times["none"])], n=4)
        encoder = getattr(module, "text_encoder", None)
        linears = sum(m.weight.numel() for m in modules["none"].denoiser.modules() if isinstance(m, torch.nn.Linear))
        frozen = sum(p.numel() for p in modules["none"].denoiser.parameters() if not p.requires_grad)
        rows.append({
            "model": model, "quantize": mode,
            "quantized_linears": len(q.quantized_linears(module.denoiser)),
            "denoiser_frozen_mb": round(frozen_bytes(module.denoiser) / 2**20, 2),
            "memory_vs_none": ratio(frozen_bytes(module.denoiser), base_bytes),
            "text_encoder_mb": round(frozen_bytes(encoder) / 2**20, 3) if encoder is not None else "",
            "lora_params": sum(p.numel() for p in module.trainable_parameters()),
            "step_ms": round(1000 * quartiles[1], 1),
            "step_iqr_ms": f"{1000 * quartiles[0]:.1f}-{1000 * quartiles[2]:.1f}",
            "step_vs_none": f"{paired[1]:.2f}x",
            "step_vs_none_iqr": f"{paired[0]:.2f}-{paired[2]:.2f}x",
            "loss_mean": round(got.mean().item(), 5),
            "loss_abs_diff": f"{diff.mean().item():.2e}",
            "loss_rel_diff_pct": round(100 * (diff / reference).mean().item(), 3),
            "loss_max_rel_diff_pct": round(100 * (diff / reference).max().item(), 3),
            "linear_weights_share": round(linears / frozen, 3),
        })  # fmt: skip
    return sorted(rows, key=lambda row: MODES.index(row["quantize"]))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_device_arguments(parser)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant (after --warmup)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--draws", type=int, default=8, help="noise/timestep draws the loss is compared on")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to this core (one thread)")
    parser.add_argument("--out", default="benchmarks/results/quantize")
    args = parser.parse_args(argv)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
        torch.set_num_threads(1)

    rows = [row for model in args.models for row in measure_model(model, args)]
    for row in rows:
        print(row, flush=True)
    import torchao

    columns = ["model", "quantize", "quantized_linears", "denoiser_frozen_mb", "memory_vs_none", "text_encoder_mb",
               "step_ms", "step_vs_none", "step_vs_none_iqr", "loss_abs_diff", "loss_rel_diff_pct",
               "loss_max_rel_diff_pct"]  # fmt: skip
    if any(row.get("refused") for row in rows):
        columns.append("refused")
    command = "python -m benchmarks.quantize" + "".join(
        f" {flag} {value}" for flag, value, default in (("--device", args.device, "cpu"),
        ("--precision", args.precision, "32-true"), ("--cpu", args.cpu, None)) if value != default
    )  # fmt: skip
    shares = ", ".join(f"{r['linear_weights_share']} of {r['model']}'s" for r in rows if r["quantize"] == "none")
    notes = [
        f"Written by `{command}` (torch {torch.__version__}, torchao {torchao.__version__}), device {args.device}, "
        f"precision {args.precision}{', one thread pinned to core ' + str(args.cpu) if args.cpu is not None else ''}. "
        f"`DiffusionBase(pretrained=<embedded model>, trainable='lora', quantize=...)`, LoRA rank 4 on the attention "
        f"q/k/v/out projections; batch of {args.batch_size} embedded-world images at 32x32 (captions for shapes-t2i, "
        "class labels for shapes-dit).",
        "Memory: bytes of the frozen denoiser's parameters and buffers, the LoRA's own weights left out, a quantised "
        "tensor counted by the tensors it stores (values, scales, nf4's table); text encoder likewise. Only linear "
        f"weights are quantised (`linear_weights_share` in the CSV: {shares} frozen weights are linear); "
        "convolutions, norms, embeddings and biases stay as loaded (float32; a -true precision casts them).",
        f"Loss: the denoising loss at initialisation (the LoRA's up matrix is zero: the base model's loss) on the same "
        f"batch with the same noise, timesteps and latent draws for every variant, {args.draws} draws; differences "
        "against the `none` row of the same model: mean absolute, mean and largest relative (%).",
        f"Step: loss + backward + AdamW on the LoRA, the four variants of a model interleaved step by step in one "
        f"process in a rotating order, {args.steps} steps after {args.warmup} warm-up per variant: median step time "
        "(interquartile range in the CSV) and median (interquartile range) of the step's ratio to the unquantised "
        "model's step of the same round (>1: slower); the VAE encodes the batch in every step of every variant "
        "alike. torchao's weight-only formats dequantise each weight (int8, fp8: to the input's dtype; nf4: block "
        "by block) in every forward and backward pass.",
    ]
    write_table(rows, args.out, "Quantised frozen base under a LoRA (model.quantize)", columns, notes)
    return rows


if __name__ == "__main__":
    main()
