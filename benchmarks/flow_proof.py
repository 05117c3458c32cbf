"""Does the flow-matching objective learn? The model of ``experiments/pretrain_shapes_flow.yaml`` (an SD3-shaped
transformer trained from scratch with rectified flow through the project's CLI), sampled through **plain diffusers**
(``DiffusionPipeline.from_pretrained`` of its export: ``StableDiffusion3Pipeline`` with the model's own
``FlowMatchEulerDiscreteScheduler``), and judged by the embedded feature network: does each sample show the colour,
shape and background its prompt names? The goal of the model-families issue: the prompted colour >= 90%.

Prompts are source captions of the embedded world (``shapes.spec_for_index``); the pretrained text-to-image UNet
(DDPM) is scored the same way for reference.

To run: python -m benchmarks.flow_proof [--export runs/pretrain_shapes_flow/export --count 256 --steps 25]
Writes benchmarks/results/flow_proof.{md,csv} and flow_proof_samples.png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.launch import REPO
from benchmarks.tables import write_table

RESULTS = REPO / "benchmarks" / "results"


def sample_plain(folder: str, prompts: list[str], steps: int, guidance: float, batch: int = 64) -> torch.Tensor:
    """Images in [0, 1] from the folder loaded by plain diffusers, one generator per image (seed = its index)."""
    from diffusers import DiffusionPipeline

    # What the folder says its pipeline must be loaded and called with (lightning-ft writes it: an SD3 without T5
    # loads with text_encoder_3=None; a T5 length other than the pipeline's default is passed to the call).
    record_file = Path(folder) / "lightning_ft.json"
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    pipe = DiffusionPipeline.from_pretrained(folder, **record.get("pipeline_load", {}))
    pipe.set_progress_bar_config(disable=True)
    side = pipe.default_sample_size * pipe.vae_scale_factor if hasattr(pipe, "default_sample_size") else None
    call = record.get("pipeline_call", {})
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        generators = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        kwargs = {**({"height": side, "width": side} if side else {}), **call}
        images = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                      output_type="pt", **kwargs).images  # fmt: skip
        out.append(images.float().clamp(0, 1))
    return torch.cat(out), type(pipe).__name__, type(pipe.scheduler).__name__


def colour_accuracy(images: torch.Tensor, prompts: list[str], net) -> dict[str, float]:
    """Colour accuracy per prompted colour (which colours the model misses)."""
    from lightning_ft.embedded.prompts import parse_prompt

    names = net.label_names["color"]
    predicted = net.predict(images)["color"].cpu()
    asked = [parse_prompt(p, {"color": names}).get("color") for p in prompts]
    result = {}
    for index, name in enumerate(names):
        rows = [i for i, a in enumerate(asked) if a == index]
        if rows:
            result[name] = float((predicted[rows] == index).float().mean())
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    from lightning_ft.embedded import asset_path, shapes
    from lightning_ft.embedded.feature_net import default_feature_net
    from lightning_ft.embedded.prompts import prompt_accuracy

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", default=str(REPO / "runs/pretrain_shapes_flow/export"))
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--out", default=str(RESULTS / "flow_proof"))
    args = parser.parse_args(argv)

    prompts = [shapes.spec_for_index(913, i).caption for i in range(args.count)]
    net = default_feature_net()
    rows = []
    models = {
        "flow model (SD3-shaped, rectified flow)": args.export,
        "embedded text-to-image UNet (DDPM, reference)": str(asset_path("shapes-t2i")),
    }
    for name, folder in models.items():
        start = time.time()
        images, pipeline, scheduler = sample_plain(folder, prompts, args.steps, args.guidance)
        accuracy = prompt_accuracy(images, prompts, net)
        by_colour = colour_accuracy(images, prompts, net)
        rows.append({
            "model": name, "pipeline": pipeline, "scheduler": scheduler, "samples": len(images),
            "colour": f"{accuracy['color']:.1%}", "shape": f"{accuracy['shape']:.1%}",
            "background": f"{accuracy['background']:.1%}", "seconds": round(time.time() - start, 1),
            "colour by prompted colour": ", ".join(f"{c} {a:.0%}" for c, a in by_colour.items()),
        })  # fmt: skip
        if name.startswith("flow"):
            from PIL import Image

            grid = images[:32].permute(0, 2, 3, 1).reshape(4, 8, 32, 32, 3).permute(0, 2, 1, 3, 4)
            array = (grid.reshape(4 * 32, 8 * 32, 3).numpy() * 255).round().astype("uint8")
            Image.fromarray(array).resize((8 * 64, 4 * 64), Image.NEAREST).save(f"{args.out}_samples.png")
            (Path(f"{args.out}_prompts.txt")).write_text("\n".join(prompts[:32]) + "\n")
    notes = [
        f"{args.count} prompts (source captions), one sample each, {args.steps} steps, guidance {args.guidance}, "
        "sampled through plain diffusers from the folder; accuracy = the embedded feature network's prediction "
        "agrees with the attribute the prompt names. Command: python -m benchmarks.flow_proof.",
    ]
    columns = ["model", "pipeline", "scheduler", "samples", "colour", "shape", "background", "seconds",
               "colour by prompted colour"]  # fmt: skip
    write_table(rows, args.out, "Does the flow-matching objective learn?", columns, notes)
    print(Path(f"{args.out}.md").read_text())
    return rows


if __name__ == "__main__":
    main()
