"""Bad inputs and what lightning-ft says about them: each case is triggered for real and its message recorded.

To run: python -m benchmarks.bad_inputs      (about two minutes; writes benchmarks/results/bad_inputs.md)
The same cases run as tests (tests/cli/test_bad_inputs.py), so the table in the README stays true.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TINY = str(REPO / "configs/model/tiny_t2i.yaml")
DREAMBOOTH = str(REPO / "experiments/dreambooth.yaml")


@dataclass
class Case:
    name: str
    run: Callable[[Path], None]  # raises (or exits) on the bad input; gets a scratch folder
    expect: tuple[str, ...]  # what the message must name


def _images(folder: Path, count: int = 2) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", (32, 32), (40 * i, 80, 120)).save(folder / f"img_{i}.png")
    return folder


def _cli(*args: str) -> None:
    from lightning_ft.run import main

    main(["--config", DREAMBOOTH, "--config", TINY, "--trainer.logger", "false", *args], run=False)


def _fit(*args: str) -> None:
    """``fit`` through the CLI, with no callbacks; the cases fail before the first step."""
    from lightning_ft.run import main

    main(["fit", "--config", DREAMBOOTH, "--config", TINY, "--trainer.logger", "false", "--trainer.callbacks", "[]",
          "--trainer.max_steps", "2", "--data.num_class_images", "2", "--model.sample_steps", "2", *args])  # fmt: skip


def _trained(tmp: Path, *args: str) -> str:
    """The last.ckpt of a 1-step run (outside ``runs/``, whose earlier outputs must stay as they are)."""
    callbacks = "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true}}]"
    _fit("--trainer.max_steps", "1", "--trainer.callbacks", callbacks, "--trainer.default_root_dir",
         str(tmp / "first"), "--trainer.enable_progress_bar", "false", *args)  # fmt: skip
    return str(tmp / "first" / "checkpoints" / "last.ckpt")


def _setup(folder: Path, **kwargs) -> None:
    from lightning_ft.data import LimitedDataModule

    LimitedDataModule(str(folder), **{"resolution": 32, **kwargs}).setup("fit")


def corrupt_image(tmp: Path) -> None:
    folder = _images(tmp / "data")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _setup(folder, instance_prompt="a sks star")


def empty_folder(tmp: Path) -> None:
    (tmp / "empty").mkdir()
    _setup(tmp / "empty", instance_prompt="a sks star")


def missing_folder(tmp: Path) -> None:
    _setup(tmp / "nowhere", instance_prompt="a sks star")


def float_image(tmp: Path) -> None:
    import numpy as np
    from PIL import Image

    folder = tmp / "data"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32), dtype=np.float32), mode="F").save(folder / "depth.tiff")
    (folder / "depth.tiff").rename(folder / "depth.png")
    _setup(folder, instance_prompt="a sks star")


def captions_for_other_files(tmp: Path) -> None:
    folder = _images(tmp / "data")
    captions = tmp / "captions.jsonl"
    captions.write_text(
        json.dumps({"file": "img_0.png", "caption": "x"})
        + "\n"
        + json.dumps({"file": "cat.png", "caption": "y"})
        + "\n"
    )
    _setup(folder, captions_file=str(captions))


def captions_bad_line(tmp: Path) -> None:
    folder = _images(tmp / "data")
    captions = tmp / "captions.jsonl"
    captions.write_text('{"file": "img_0.png", "caption": "x"}\n{"file": "img_1.png"\n')
    _setup(folder, captions_file=str(captions))


def no_captions_no_prompt(tmp: Path) -> None:
    _setup(_images(tmp / "data"))


def class_images_without_prompt(tmp: Path) -> None:
    _setup(_images(tmp / "data"), instance_prompt="a sks star", num_class_images=10)


def unknown_key(tmp: Path) -> None:
    _cli("--model.init_args.learning_rate", "1e-4")


def wrong_type(tmp: Path) -> None:
    _cli("--model.init_args.lr", "fast")


def missing_pretrained(tmp: Path) -> None:
    from lightning_ft.core import DiffusionBase

    DiffusionBase(pretrained=str(tmp / "no-such-model"))


def bad_trainable(tmp: Path) -> None:
    _cli("--model.init_args.trainable", "everything")


def method_incompatible_with_model(tmp: Path) -> None:
    import yaml

    from lightning_ft.methods import ConditionTuning

    components = yaml.safe_load((REPO / "configs/model/tiny_dit.yaml").read_text())["model"]["init_args"]["components"]
    ConditionTuning(components=components)


def resolution_mismatch(tmp: Path) -> None:
    import yaml

    from lightning_ft.methods import DreamBooth

    components = yaml.safe_load(Path(TINY).read_text())["model"]["init_args"]["components"]
    DreamBooth(components=components).check_resolution(30)


def lora_targets_match_nothing(tmp: Path) -> None:
    _cli("--model.init_args.trainable", "lora", "--model.init_args.lora_target_modules", "[to_nothing]")


def class_model_without_labels(tmp: Path) -> None:
    import types

    import yaml

    from lightning_ft.core import DiffusionBase
    from lightning_ft.data import LimitedDataModule

    components = yaml.safe_load((REPO / "configs/model/tiny_dit.yaml").read_text())["model"]["init_args"]["components"]
    data = LimitedDataModule(str(_images(tmp / "data")), instance_prompt="x", resolution=32)
    data.trainer = types.SimpleNamespace(lightning_module=DiffusionBase(components=components))
    data.setup("fit")


def bad_sweep_file(tmp: Path) -> None:
    from lightning_ft.sweep import load_sweep

    (tmp / "sweep.yaml").write_text("command:\n  - python\n  - train.py\nparameters: {}\nmetric: {name: fid/fid}\n")
    load_sweep(tmp / "sweep.yaml")


def a3fta_export_as_plain(tmp: Path) -> None:
    import yaml

    from lightning_ft.core import DiffusionBase
    from lightning_ft.methods import AdapterAttentionFineTuning

    components = yaml.safe_load(Path(TINY).read_text())["model"]["init_args"]["components"]
    folder = AdapterAttentionFineTuning(components=components).save_pretrained(tmp / "export")
    DiffusionBase(pretrained=str(folder))


def unknown_embedded_target(tmp: Path) -> None:
    from lightning_ft.embedded.targets import ensure_target

    ensure_target("dragons", tmp)


def several_unreadable_images(tmp: Path) -> None:
    folder = _images(tmp / "data", 3)
    (folder / "broken_a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "broken_b.jpg").write_bytes(b"nothing")
    _setup(folder, instance_prompt="a sks star")


def lora_rank_zero(tmp: Path) -> None:
    _cli("--model.init_args.trainable", "lora", "--model.init_args.lora_rank", "0")


def zero_sample_steps(tmp: Path) -> None:
    _cli("--model.init_args.sample_steps", "0")


def pretrained_without_denoiser(tmp: Path) -> None:
    import shutil

    from lightning_ft.embedded import asset_path
    from lightning_ft.run import main

    folder = tmp / "no-denoiser"
    shutil.copytree(asset_path("shapes-t2i"), folder, ignore=shutil.ignore_patterns("unet"))
    main(["--config", DREAMBOOTH, "--trainer.logger", "false", "--model.init_args.pretrained", str(folder)], run=False)


def negative_lr(tmp: Path) -> None:
    _cli("--model.init_args.lr", "-1")


def lr_scheduler_typo(tmp: Path) -> None:
    _cli("--model.init_args.lr_scheduler", "cosin")


def prediction_type_typo(tmp: Path) -> None:
    _cli("--model.init_args.prediction_type", "v-prediction")


def empty_instance_prompt(tmp: Path) -> None:
    _cli("--data.init_args.instance_prompt", "")


def negative_class_images(tmp: Path) -> None:
    _cli("--data.init_args.num_class_images", "-3")


def condition_dropout_over_one(tmp: Path) -> None:
    _cli("--model.init_args.condition_dropout", "1.5")


def ema_decay_over_one(tmp: Path) -> None:
    _cli("--model.init_args.ema_decay", "2.0")


def zero_steps(tmp: Path) -> None:
    _fit("--trainer.max_steps", "0")


def ckpt_not_a_checkpoint(tmp: Path) -> None:
    # The earlier run's last.ckpt of the scratch folder holds a few bytes of text.
    _fit("--ckpt_path", "runs/dreambooth/lightning_logs/version_0/checkpoints/last.ckpt")


def ckpt_missing(tmp: Path) -> None:
    _fit("--ckpt_path", "last.ckpt")


def ckpt_last_without_earlier_run(tmp: Path) -> None:
    _fit("--ckpt_path", "last", "--trainer.default_root_dir", str(tmp / "elsewhere"))


def ckpt_of_another_method(tmp: Path) -> None:
    _fit("--model.class_path", "lightning_ft.methods.BayesianFineTuning", "--ckpt_path", _trained(tmp))


def ckpt_of_another_trainable_set(tmp: Path) -> None:
    _fit("--model.trainable", "lora", "--ckpt_path", _trained(tmp))


def ckpt_of_another_lora_rank(tmp: Path) -> None:
    ckpt = _trained(tmp, "--model.trainable", "lora")
    _fit("--model.trainable", "lora", "--model.lora_rank", "8", "--ckpt_path", ckpt)


def checkpoint_every_without_checkpoint(tmp: Path) -> None:
    _fit("--checkpoint_every", "50")


CASES = [
    Case("corrupt image in the instance folder", corrupt_image, ("broken.png", "cannot be read")),
    Case("empty instance folder", empty_folder, ("data.instance_dir", "holds no image")),
    Case("instance folder does not exist", missing_folder, ("data.instance_dir", "does not exist")),
    Case("32-bit float image", float_image, ("depth.png", "mode 'F'")),
    Case("captions file names other images", captions_for_other_files, ("captions.jsonl", "cat.png")),
    Case("captions file with a broken line", captions_bad_line, ("captions.jsonl", "line 2")),
    Case("no captions and no prompt", no_captions_no_prompt, ("data.instance_dir", "no prompt")),
    Case("class images without a class prompt", class_images_without_prompt, ("data.class_prompt",)),
    Case("unknown config key", unknown_key, ("learning_rate",)),
    Case("wrong type for a key", wrong_type, ("lr", "fast")),
    Case("nonexistent pretrained path", missing_pretrained, ("model.pretrained", "no-such-model")),
    Case("unknown trainable set", bad_trainable, ("model.trainable", "everything")),
    Case("method incompatible with the model (ANL on a DiT)", method_incompatible_with_model, ("ResnetBlock2D",)),
    Case("resolution the model cannot take", resolution_mismatch, ("data.resolution=30",)),
    Case("LoRA targets that match no layer", lora_targets_match_nothing, ("lora_target_modules", "to_nothing")),
    Case("class-conditional model, data without labels", class_model_without_labels, ("data.class_label",)),
    Case("sweep file without ${args} / the project CLI", bad_sweep_file, ("sweep.yaml", "command")),
    Case("A3FTA export loaded as a plain model", a3fta_export_as_plain, ("AdapterAttentionFineTuning",)),
    Case("unknown embedded target", unknown_embedded_target, ("dragons",)),
    Case("several unreadable images", several_unreadable_images, ("2 of 5 images", "broken_a.png", "broken_b.jpg")),
    Case("LoRA rank 0", lora_rank_zero, ("model.lora_rank=0",)),
    Case("0 sampling steps", zero_sample_steps, ("model.sample_steps=0",)),
    Case("pretrained folder without a denoiser", pretrained_without_denoiser, ("model.pretrained", "unet/")),
    Case("negative learning rate", negative_lr, ("model.lr=-1",)),
    Case("typo in the LR schedule", lr_scheduler_typo, ("model.lr_scheduler='cosin'",)),
    Case("typo in the prediction type", prediction_type_typo, ("model.prediction_type='v-prediction'",)),
    Case("empty instance prompt", empty_instance_prompt, ("data.instance_prompt=''",)),
    Case("negative number of class images", negative_class_images, ("data.num_class_images=-3",)),
    Case("condition dropout over 1", condition_dropout_over_one, ("model.condition_dropout=1.5",)),
    Case("EMA decay over 1", ema_decay_over_one, ("model.ema_decay=2.0",)),
    Case("0 training steps", zero_steps, ("trainer.max_steps=0",)),
    Case("ckpt_path that is not a checkpoint", ckpt_not_a_checkpoint, ("ckpt_path", "not a Lightning checkpoint")),
    Case("ckpt_path that does not exist", ckpt_missing, ("ckpt_path='last.ckpt'", "does not exist")),
    Case("ckpt_path last with no earlier run", ckpt_last_without_earlier_run, ("ckpt_path='last'", "no last.ckpt")),
    Case("checkpoint of another method", ckpt_of_another_method, ("DreamBooth", "BayesianFineTuning")),
    Case("checkpoint of another trainable set", ckpt_of_another_trainable_set, ("'full'", "'lora'")),
    Case("checkpoint of another LoRA rank", ckpt_of_another_lora_rank, ("lora_rank: 4 in the checkpoint, 8 now",)),
    Case("checkpoint_every without a ModelCheckpoint", checkpoint_every_without_checkpoint, ("checkpoint_every=50",)),
]


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def trigger(case: Case) -> tuple[str, str, bool]:
    """Run a case in a scratch folder that already holds a previous run's outputs (as the working directory, where
    the experiment files write ``runs/``); returns (error type, message, previous outputs intact). A case that does not
    fail raises AssertionError."""
    stderr = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(stderr), contextlib.chdir(tmp):
        previous = Path(tmp) / "runs" / "dreambooth" / "lightning_logs" / "version_0"
        (previous / "checkpoints").mkdir(parents=True)
        (previous / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run's checkpoint")
        (previous / "metrics.csv").write_text("step,train/loss\n0,0.5\n")
        before = _snapshot(Path(tmp) / "runs")
        try:
            try:
                case.run(Path(tmp))
            except Exception as error:  # noqa: BLE001 - the scratch folder's name is noise in the table
                raise type(error)(str(error).replace(tmp, "<tmp>")) from None
        except SystemExit:  # the CLI parser prints its error and exits with status 2
            text = stderr.getvalue()
            text = text[text.rfind("error:") :] if "error:" in text else text[-500:]
            # jsonargparse lists every Union member it tried; the project's line is the informative one.
            keep = [
                line.strip()
                for line in text.splitlines()
                if not line.strip().startswith(
                    ("Subtypes", "Given value", "- Expected a <class 'NoneType'>", "Does not validate")
                )
            ]
            return "CLI exit 2", " ".join(k for k in keep if k), _snapshot(Path(tmp) / "runs") == before
        except Exception as error:  # noqa: BLE001 - recording what each bad input raises is the point
            message = str(error)
            if "Does not validate against any of the Union subtypes" in message:  # the module raised under the CLI
                message = message[message.find("- ") + 2 :].split("\n")[0] if "- " in message else message
            return type(error).__name__, message, _snapshot(Path(tmp) / "runs") == before
    raise AssertionError(f"bad input {case.name!r} did not fail")


def main() -> list[dict]:
    rows = []
    for case in CASES:
        kind, message, intact = trigger(case)
        rows.append({"input": case.name, "error": kind, "message": " ".join(message.split())[:300], "intact": intact})
        print(f"{case.name}: {kind}: {rows[-1]['message']}", flush=True)
    lines = ["| bad input | error | message (first 300 characters) |", "|---|---|---|"]
    lines += [f"| {r['input']} | {r['error']} | {r['message'].replace('|', '/')} |" for r in rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bad_inputs.md").write_text("\n".join(lines) + "\n")
    return rows


if __name__ == "__main__":
    main()
