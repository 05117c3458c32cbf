"""Released-code parity, measured: lightning-ft's losses against the released BNN and Diff-Tuning code.

    python -m benchmarks.released_parity --bnn PATH --diff-tuning PATH [--out FILE]

``--bnn``: a checkout of ``Nicholas0228/BNN-Finetuning-DMs``; ``--diff-tuning``: a checkout of
``thuml/Diffusion-Tuning`` (either may be left out). The user fetches them; nothing of them is in this repository:
their modules are imported from PATH at run time, and the statements of their training scripts that compute the
loss are read from PATH and executed (``ast``), on a tiny model built from ``configs/model/tiny_t2i.yaml`` and
``configs/model/tiny_dit.yaml``. The released code needs what it imports: ``torchvision`` (both repositories) and
``timm`` (Diff-Tuning's ``models.py``, for its label handling only).

What is compared (docs/methods.md, "Released-code parity (measured)"):

- BNN, DreamBooth (full): the released ``train_dreambooth_bayes.py`` runs one training step in-process (its
  ``main``; CUDA-only calls made no-ops on the CPU: ``.cuda()``, ``torch.tensor(..., device='cuda')``) on a tiny
  Stable Diffusion folder; every random draw of that step (VAE latent, noise, timesteps, one noise tensor per
  Bayesian weight and bias) is recorded and replayed into ``BayesianFineTuning`` on the same batch and weights:
  instance, prior, KL and total loss, KL weight 0 (released) and nonzero on a perturbed posterior.
- BNN, LoRA: the released ``train_dreambooth_bayes_lora.py`` builds its LoRA through diffusers' old
  ``LoRAAttnProcessor(hidden_size, cross_attention_dim)``, an empty stub in recent diffusers, so its ``main`` cannot
  run; its own conversion loop (``bayesian_lora.convert``), KL and training-step statements run on the tiny UNet,
  with its ``LoRARandLinearLayer`` added to each q/k/v/out projection as the old processor added it.
- Diff-Tuning: ``train.py`` needs CUDA; its statements that build the two timestep distributions, draw timesteps,
  split a batch into target and memory images, load memory images and combine the two losses are executed, and its
  ``GaussianDiffusion.training_losses`` runs with lightning-ft's tiny DiT as the network; its label handling is its
  ``DiT.forward``.

Tolerances: bitwise where the arithmetic is the same; otherwise a stated bound and the reason (diagnostic rows
remove the causes and show what remains). A row whose values differ beyond its bound without a known reason reads
"DIFFERS: unexplained", and the command then exits with status 1.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import inspect
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "released_parity.md"
EXPECTED_TIME = "about 15 s on 2 idle CPU cores, one to two minutes when they are busy"

#: The released repositories: name, and files a checkout must have (checked before anything runs).
CHECKOUTS = {
    "bnn": (
        "Nicholas0228/BNN-Finetuning-DMs",
        ("train_dreambooth_bayes.py", "train_dreambooth_bayes_lora.py", "bayesian.py", "bayesian_lora.py",
         "models/layers/linear.py", "models/layers/lora_layer.py"),
    ),
    "diff_tuning": (
        "thuml/Diffusion-Tuning",
        ("train.py", "models.py", "diffusion/__init__.py", "diffusion/gaussian_diffusion.py"),
    ),
}  # fmt: skip
FLAGS = {"bnn": "--bnn", "diff_tuning": "--diff-tuning"}

# The BNN settings of the released scripts (run_scripts_bayes_*.sh): sigma_0 = sigma_p = 0.01, KL weight 0.
SIGMA = 0.01
#: The nonzero KL weight of the "KL on" rows (the released parser's default is 0.2, on a sum over every element).
KL_WEIGHT = 1e-4
INSTANCE_PROMPT, CLASS_PROMPT = "a sks square", "a square"
RESOLUTION = 32  # the tiny models' images
BATCH = 2  # instance images per step (and as many class images)
#: Why the BNN UNet outputs differ by ~1e-6: the released latents keep the VAE's channels-last layout (the noise
#: drawn like them too) where lightning-ft makes them contiguous, so conv and GroupNorm run other kernels; and
#: lightning-ft samples W = addcmul(mu, sigma, eps), rounded once, the released layer mu + sigma * eps, twice.
#: The diagnostic rows remove both (``our_step(channels_last=True, two_rounding=True)``) and are bitwise equal.
BOTH = "latent layout and addcmul weight sample: see the diagnostic rows"
SAMPLE = "weight sample by addcmul: 1 ulp per weight"
#: Relative bound of the BNN losses (the causes above).
LOSS_RTOL = 1e-5
DRAWS = 200_000  # timesteps drawn from each distribution
MEMORY_STEPS = 2000  # steps of memory draws
BANK = 64  # memory-bank images


# ------------------------------------------------------------------------------------------------------ table
@dataclass
class Row:
    what: str
    released: str
    ours: str
    diff: str
    verdict: str

    def cells(self) -> list[str]:
        return [self.what, self.released, self.ours, self.diff, self.verdict]


COLUMNS = ["what", "released", "lightning-ft", "abs diff", "verdict"]


def fmt(value) -> str:
    """A value for the table: floats with 9 significant digits, the rest as text."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.9g}"
    return str(value)


def compare(what: str, released, ours, tol: float = 0.0, reason: str = "", known: str | None = None) -> Row:
    """A numeric row. Verdict: ``equal (bitwise)``; ``equal (|diff| <= tol: reason)``; with ``known`` (why ours
    differs and whether it is kept), ``differs: known``; else ``DIFFERS: unexplained``. ``tol`` is absolute."""
    r, o = float(released), float(ours)
    diff = abs(r - o)
    if diff == 0.0:
        verdict = "equal (bitwise)"
    elif diff <= tol:
        verdict = f"equal (abs diff <= {tol:.1e}: {reason})" if reason else f"equal (abs diff <= {tol:.1e})"
    elif known:
        verdict = f"differs: {known}"
    else:
        verdict = f"DIFFERS: unexplained (bound {tol:.1e})"
    return Row(what, fmt(r), fmt(o), f"{diff:.3g}", verdict)


def text_row(what: str, released, ours, known: str | None = None, note: str = "") -> Row:
    """A row of values compared as text: equal when the strings are, else ``known`` or unexplained."""
    r, o = fmt(released), fmt(ours)
    if r == o:
        verdict = f"equal{f' ({note})' if note else ''}"
    elif known:
        verdict = f"differs: {known}"
    else:
        verdict = "DIFFERS: unexplained"
    return Row(what, r, o, "-", verdict)


def tensor_row(what: str, released: torch.Tensor, ours: torch.Tensor, tol: float = 0.0, reason: str = "",
               known: str | None = None) -> Row:  # fmt: skip
    """Two tensors: each shown by its shape and mean absolute value, compared by the max abs difference."""
    diff = (released.detach().double() - ours.detach().double()).abs().max().item()
    verdict = compare(what, 0.0, diff, tol, reason, known).verdict

    def show(x: torch.Tensor) -> str:
        return f"{'x'.join(map(str, x.shape))}, mean abs {x.detach().double().abs().mean().item():.6g}"

    return Row(what, show(released), show(ours), f"{diff:.3g}", verdict)


def unexplained(rows: list[Row]) -> list[Row]:
    return [row for row in rows if row.verdict.startswith("DIFFERS")]


def write_report(rows: list[Row], out: str | Path, meta: dict) -> Path:
    """The table (``COLUMNS``, one row per comparison) and what produced it: ``meta`` holds ``command``,
    ``versions`` (name -> version), ``checkouts`` (repository -> commit), ``seconds`` and ``notes`` (lines)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Released-code parity (measured)", ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row.cells()) + " |" for row in rows]
    lines += ["", f"Command: `{meta.get('command', '')}`"]
    checkouts = meta.get("checkouts") or {}
    if checkouts:
        lines.append("Checkouts: " + ", ".join(f"`{repo}@{commit}`" for repo, commit in checkouts.items()) + ".")
    versions = meta.get("versions") or {}
    if versions:
        lines.append("Versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()) + ".")
    if meta.get("seconds") is not None:
        lines.append(f"Ran in {meta['seconds']:.0f} s.")
    notes = list(meta.get("notes") or [])
    if notes:
        lines += ["", *notes]
    out.write_text("\n".join(lines).rstrip() + "\n")
    return out


# -------------------------------------------------------------------------------------------------- checkouts
def check_checkout(path: str | Path, which: str) -> Path:
    """``path`` as a checkout of the released repository ``which`` (``bnn`` or ``diff_tuning``); a ValueError naming
    the flag, the path and what is missing otherwise."""
    repo, files = CHECKOUTS[which]
    flag, path = FLAGS[which], Path(path)
    if not path.is_dir():
        raise ValueError(f"{flag} {path}: no such directory (expected a checkout of {repo})")
    missing = [f for f in files if not (path / f).is_file()]
    if missing:
        other = [n for n, (_, fs) in CHECKOUTS.items() if n != which and all((path / f).is_file() for f in fs)]
        hint = f"; it looks like a checkout of {CHECKOUTS[other[0]][0]} (pass it as {FLAGS[other[0]]})" if other else ""
        raise ValueError(f"{flag} {path}: not a checkout of {repo}: missing {', '.join(missing)}{hint}")
    return path


def checkout_commit(path: str | Path) -> str:
    """``git rev-parse HEAD`` of ``path`` when it is the top of a git work tree, else ``unknown``."""
    path = Path(path).resolve()
    try:
        top = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
        if Path(top).resolve() != path:
            return "unknown"
        return subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@contextlib.contextmanager
def released_imports(path: Path):
    """``import`` finds the checkout's modules (first on ``sys.path``); on exit they are forgotten, and modules of
    the same top-level names imported before are put back (both repositories have a ``models``)."""
    path = Path(path).resolve()
    names = {p.stem if p.suffix == ".py" else p.name for p in path.iterdir() if p.suffix == ".py" or p.is_dir()}
    stashed = {n: m for n, m in sys.modules.items() if n.split(".")[0] in names}
    for name in stashed:
        del sys.modules[name]
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))
        for name in [n for n in sys.modules if n.split(".")[0] in names]:
            del sys.modules[name]
        sys.modules.update(stashed)


def import_file(path: Path, name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CPUTorch(types.ModuleType):
    """``torch`` for the released modules' namespaces: ``torch.tensor(..., device='cuda')`` makes a CPU tensor."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        if name == "tensor":
            return self.tensor_on_cpu
        return getattr(torch, name)

    @staticmethod
    def tensor_on_cpu(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return torch.tensor(*args, **kwargs)


@contextlib.contextmanager
def patched(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield original
    finally:
        setattr(owner, name, original)


@contextlib.contextmanager
def quiet():
    """Drop what the released code prints (a line per layer it converts or skips)."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


@contextlib.contextmanager
def cuda_calls_on_cpu():
    """``Module.cuda()`` and ``Tensor.cuda()`` return the object itself (the released scripts call them)."""
    with patched(torch.nn.Module, "cuda", lambda self, *a, **k: self):
        with patched(torch.Tensor, "cuda", lambda self, *a, **k: self):
            yield


# ------------------------------------------------------------------------------------------- released source
class ReleasedSource:
    """The source of one released script, and its statements by what they contain (executed with ``run``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.text = self.path.read_text()
        self.tree = ast.parse(self.text)

    def source(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node) or ""

    def function(self, name: str) -> ast.FunctionDef:
        for node in self.tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                return node
        raise LookupError(f"{self.path.name}: no function {name}() (another version of the released code?)")

    def find(self, kind: type, *contains: str, within: ast.AST | None = None, exact: str | None = None) -> ast.stmt:
        """The innermost statement of type ``kind`` (inside ``within``, default the module) whose source contains
        every string of ``contains`` (or equals ``exact``); a LookupError naming the file otherwise."""
        def wanted(node) -> bool:
            text = self.source(node)
            return text.strip() == exact if exact is not None else all(c in text for c in contains)

        found = [node for node in ast.walk(within or self.tree) if isinstance(node, kind) and wanted(node)]
        if not found:
            wanted = exact if exact is not None else " ... ".join(contains)
            raise LookupError(
                f"{self.path.name}: no {kind.__name__} statement with {wanted!r} (another version of the released "
                "code?)"
            )
        return min(found, key=lambda n: (n.end_lineno - n.lineno, n.lineno))

    def run(self, nodes, namespace: dict) -> dict:
        """Execute ``nodes`` (statements of this file) in ``namespace``; returns it."""
        nodes = nodes if isinstance(nodes, list) else [nodes]
        code = compile(ast.Module(body=list(nodes), type_ignores=[]), str(self.path), "exec")
        exec(code, namespace)  # noqa: S102 - the released code, run on purpose
        return namespace


# --------------------------------------------------------------------------------------------- random draws
class RandomTape:
    """Records the tensors ``torch.randn``, ``torch.randn_like`` and ``torch.randint`` return, then gives them back
    in the same order per function (``replaying``), checking each shape: the second code path then sees the first
    one's VAE latent, noise, timesteps and weight noise whatever order it draws them in across functions."""

    FUNCTIONS = ("randn", "randn_like", "randint")

    def __init__(self):
        self.draws: dict[str, list[torch.Tensor]] = {name: [] for name in self.FUNCTIONS}
        self._originals: dict = {}

    @property
    def active(self) -> bool:
        """Whether it is recording."""
        return bool(self._originals)

    def start(self) -> None:
        """Begin recording (the patches stay until ``stop``)."""
        if self._originals:
            return
        self._originals = {name: getattr(torch, name) for name in self.FUNCTIONS}
        for name, original in self._originals.items():
            setattr(torch, name, self._recorder(name, original))

    def stop(self) -> None:
        for name, original in self._originals.items():
            setattr(torch, name, original)
        self._originals = {}

    def _recorder(self, name, original):
        def call(*args, **kwargs):
            out = original(*args, **kwargs)
            self.draws[name].append(out.detach().clone())
            return out

        return call

    @contextlib.contextmanager
    def recording(self):
        self.start()
        try:
            yield self
        finally:
            self.stop()

    @contextlib.contextmanager
    def replaying(self):
        queues = {name: list(draws) for name, draws in self.draws.items()}
        originals = {name: getattr(torch, name) for name in self.FUNCTIONS}

        def replayer(name):
            def call(*args, **kwargs):
                template = originals[name](*args, **kwargs)
                if not queues[name]:
                    raise RuntimeError(f"replay: torch.{name} called more often than in the recorded run")
                value = queues[name].pop(0)
                if value.shape != template.shape:
                    raise RuntimeError(
                        f"replay: torch.{name} asked for shape {tuple(template.shape)}, the recorded run drew "
                        f"{tuple(value.shape)} at this point"
                    )
                return value.to(device=template.device, dtype=template.dtype).requires_grad_(template.requires_grad)

            return call

        for name in self.FUNCTIONS:
            setattr(torch, name, replayer(name))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch, name, original)
        left = {name: len(q) for name, q in queues.items() if q}
        if left:
            raise RuntimeError(f"replay: recorded draws left unused: {left}")

    def count(self) -> dict[str, int]:
        return {name: len(draws) for name, draws in self.draws.items()}


class Spy:
    """Records the calls of a class's ``forward`` while ``active`` (arguments and output, detached)."""

    def __init__(self, owner: type, keep):
        self.owner, self.keep, self.calls, self.active = owner, keep, [], False

    @contextlib.contextmanager
    def installed(self):
        original = self.owner.forward
        spy = self

        def forward(module, *args, **kwargs):
            out = original(module, *args, **kwargs)
            if spy.active:
                spy.calls.append(spy.keep(args, kwargs, out))
            return out

        with patched(self.owner, "forward", forward):
            yield self


def unet_call(args, kwargs, out) -> dict:
    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    context = args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")
    prediction = out.sample if hasattr(out, "sample") else out[0]
    return {"x_t": sample.detach().clone(), "t": torch.as_tensor(timestep).clone(),
            "context": context.detach().clone(), "prediction": prediction.detach().clone()}  # fmt: skip


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors if t is not None])


@contextlib.contextmanager
def two_rounding_samples():
    """lightning-ft's weight sample ``addcmul(mu, sigma, eps)`` computed as the released ``mu + sigma * eps``."""

    def addcmul(input, tensor1, tensor2, *, value=1):
        if value != 1:
            raise ValueError("two_rounding_samples: only value=1")
        return input + tensor1 * tensor2

    with patched(torch, "addcmul", addcmul):
        yield


# ---------------------------------------------------------------------------------------------- tiny models
def tiny_components(model: str) -> dict:
    config = yaml.safe_load((REPO / f"configs/model/{model}.yaml").read_text())
    return config["model"]["init_args"]["components"]


def write_images(folder: Path, count: int, seed: int) -> list[np.ndarray]:
    """``count`` distinct images of the embedded world at ``RESOLUTION``, as PNG files; returns them (H, W, 3)."""
    from PIL import Image

    from lightning_ft.embedded import shapes

    folder.mkdir(parents=True, exist_ok=True)
    images, seen, index = [], set(), 0
    while len(images) < count:
        image = shapes.render(shapes.spec_for_index(seed, index), RESOLUTION)
        index += 1
        key = (image.tobytes(), np.ascontiguousarray(image[:, ::-1]).tobytes())
        if key[0] in seen or key[1] in seen or key[0] == key[1]:
            continue  # distinct, and distinct from every mirror image (flips are identified below)
        seen.update(key)
        Image.fromarray(image).save(folder / f"img_{len(images):03d}.png")
        images.append(image)
    return images


def write_tiny_sd(folder: Path) -> Path:
    """A Stable Diffusion pipeline folder of ``configs/model/tiny_t2i.yaml`` (random weights, seed 0)."""
    from lightning_ft.methods import DreamBooth

    torch.manual_seed(0)
    return DreamBooth(components=tiny_components("tiny_t2i"), sample_steps=2).save_pretrained(folder)


# --------------------------------------------------------------------------------------------------------- BNN
def bnn_argv(folder: Path, data: Path, out: Path, kl_weight: float) -> list[str]:
    """The flags of the released ``run_scripts_bayes_dreambooth.sh`` on the tiny model, one step of batch
    ``BATCH`` (the released scripts train with batch 1 at 512 px)."""
    return [
        f"--pretrained_model_name_or_path={folder}", f"--instance_data_dir={data / 'instance'}",
        f"--class_data_dir={data / 'class'}", f"--output_dir={out}", f"--instance_prompt={INSTANCE_PROMPT}",
        "--with_prior_preservation", "--prior_loss_weight=1.0", f"--class_prompt={CLASS_PROMPT}",
        f"--resolution={RESOLUTION}", "--center_crop", f"--train_batch_size={BATCH}", "--gradient_accumulation_steps=1",
        "--learning_rate=5e-6", "--lr_scheduler=constant", "--lr_warmup_steps=0", "--max_train_steps=1",
        "--checkpointing_steps=1000", "--seed=0", "--name=parity", f"--num_class_images={BATCH}",
        f"--lambda1={kl_weight}", f"--init_sigma={SIGMA}", f"--prior_sigma={SIGMA}", "--convert_up_block",
        "--convert_mid_block", "--convert_down_block", "--convert_subblock_0", "--convert_subblock_1",
        "--convert_subblock_2", "--convert_subblock_3", "--convert_ff", "--convert_linear",
    ]  # fmt: skip


def perturb_posterior(pairs: list[tuple[torch.Tensor, torch.Tensor]], seed: int = 1) -> None:
    """Move a posterior off its prior, in place: mu += sigma_p * N(0, 1), sigma *= exp(N(0, 1) / 2) (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mu, sigma in pairs:
            mu.add_(SIGMA * torch.randn(mu.shape, generator=generator))
            sigma.mul_(torch.exp(0.5 * torch.randn(sigma.shape, generator=generator)))


def released_layers(module: torch.nn.Module, class_name: str) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in module.named_modules() if type(m).__name__ == class_name}


def full_pairs(layers: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pairs = []
    for layer in layers.values():
        pairs.append((layer.mu_weight, layer.sigma_weight))
        if layer.mu_bias is not None:
            pairs.append((layer.mu_bias, layer.sigma_bias))
    return pairs


def snapshot(layers: dict) -> dict[str, dict[str, torch.Tensor]]:
    return {
        name: {k: v.detach().clone() for k, v in layer.named_parameters(recurse=True)} for name, layer in layers.items()
    }


def run_released_bnn_full(path: Path, folder: Path, data: Path, out: Path, kl_weight: float, perturb: bool) -> dict:
    """One step of the released ``train_dreambooth_bayes.py`` (its ``main``), recorded."""
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    record: dict = {"mse": []}
    tape = RandomTape()
    unet_spy = Spy(UNet2DConditionModel, unet_call)
    text_spy = Spy(CLIPTextModel, lambda a, k, o: (a[0] if a else k["input_ids"]).clone())
    with released_imports(path), cuda_calls_on_cpu(), unet_spy.installed(), text_spy.installed():
        script = import_file(path / "train_dreambooth_bayes.py", "released_train_dreambooth_bayes")
        bayesian = sys.modules["bayesian"]
        script.torch = bayesian.torch = CPUTorch()
        args = script.parse_args(bnn_argv(folder, data, out, kl_weight))
        convert, kl_function, depth = bayesian.convert_with_config, bayesian.cal_KL_modules, [0]
        mse = torch.nn.functional.mse_loss

        def convert_with_config(module, arguments):
            unet = convert(module, arguments)
            layers = released_layers(unet, "RandLinear")
            record["converted"] = snapshot(layers)
            if perturb:
                perturb_posterior(full_pairs(layers))
            record["initial"] = snapshot(layers)
            return unet

        def cal_kl_modules(*a, **k):
            depth[0] += 1
            try:
                value = kl_function(*a, **k)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                record["kl"] = float(torch.as_tensor(value).detach())
            return value

        def recorded_mse(*a, **k):
            value = mse(*a, **k)
            record["mse"].append(float(value.detach()))
            return value

        def encode(vae, pixels, *a, **k):
            if not tape.active:  # the training step starts here: record its draws and losses
                record["pixel_values"] = pixels.detach().clone()
                tape.start()
                unet_spy.active = text_spy.active = True
            return encode_original(vae, pixels, *a, **k)

        def backward(accelerator, loss, *a, **k):
            record["loss"] = float(loss.detach())
            tape.stop()
            unet_spy.active = text_spy.active = False
            return backward_original(accelerator, loss, *a, **k)

        bayesian.convert_with_config, bayesian.cal_KL_modules = convert_with_config, cal_kl_modules
        with patched(AutoencoderKL, "encode", encode) as encode_original, patched(
            Accelerator, "backward", backward
        ) as backward_original, patched(torch.nn.functional, "mse_loss", recorded_mse), quiet():
            script.main(args)
        tape.stop()
    record["tape"], record["unet"], record["input_ids"] = tape, unet_spy.calls, text_spy.calls
    return record


def our_bnn(folder: Path, trainable: str, kl_weight: float, initial: dict, copy) -> object:
    """``BayesianFineTuning`` on the folder, the released initial state copied in by ``copy(module, initial)``."""
    from lightning_ft.methods import BayesianFineTuning

    torch.manual_seed(0)
    module = BayesianFineTuning(
        pretrained=str(folder), trainable=trainable, lora_rank=4, sigma_init=SIGMA, prior_sigma=SIGMA,
        kl_weight=kl_weight, prior_loss_weight=1.0, sample_steps=2,
    )  # fmt: skip
    copy(module, initial)
    return module.train()


def copy_full(module, initial: dict) -> None:
    from lightning_ft.nn.bayesian import bayesian_layers

    layers = bayesian_layers(module.denoiser)
    with torch.no_grad():
        for name, params in initial.items():
            layer = layers[name]
            layer.weight_mu.copy_(params["mu_weight"])
            layer.weight_sigma.copy_(params["sigma_weight"])
            if layer.bias_mu is not None:
                layer.bias_mu.copy_(params["mu_bias"])
                layer.bias_sigma.copy_(params["sigma_bias"])


def our_step(module, pixels: torch.Tensor, tape: RandomTape, two_rounding: bool = False,
             channels_last: bool = False) -> dict:  # fmt: skip
    """lightning-ft's loss on the released batch (first half instance, second half class images) with the
    released run's random draws. Diagnostics: ``two_rounding`` samples weights as the released layer does
    (``two_rounding_samples``); ``channels_last`` gives the UNet latents in the released memory layout (the VAE's
    channels-last output, which lightning-ft makes contiguous: other conv and GroupNorm kernels run)."""
    from diffusers import UNet2DConditionModel

    n = len(pixels) // 2
    batch = {"pixel_values": pixels[:n], "class_pixel_values": pixels[n:], "prompts": [INSTANCE_PROMPT] * n,
             "class_prompts": [CLASS_PROMPT] * n}  # fmt: skip
    spy = Spy(UNet2DConditionModel, unet_call)
    spy.active = True
    sampling = two_rounding_samples() if two_rounding else contextlib.nullcontext()
    encode = module.encode_images
    if channels_last:
        module.encode_images = lambda *a, **k: encode(*a, **k).contiguous(memory_format=torch.channels_last)
    try:
        with spy.installed(), tape.replaying(), sampling:
            loss, logs = module.training_loss(batch)
    finally:
        if channels_last:
            del module.encode_images
    return {"loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}, "unet": spy.calls}


def bnn_full_rows(path: Path, folder: Path, data: Path, work: Path) -> tuple[list[Row], dict]:
    from lightning_ft.nn.bayesian import bayesian_layers

    rows: list[Row] = []
    first = None
    for kl_weight, perturb in ((0.0, False), (KL_WEIGHT, True)):
        tag = "KL off (weight 0, released)" if kl_weight == 0 else f"KL on (weight {kl_weight:g}, perturbed q)"
        released = run_released_bnn_full(path, folder, data, work / f"out_{kl_weight:g}", kl_weight, perturb)
        first = first or released
        module = our_bnn(folder, "full", kl_weight, released["initial"], lambda m, i: None)
        ours_layers = bayesian_layers(module.denoiser)
        if kl_weight == 0:
            names_r, names_o = set(released["converted"]), set(ours_layers)
            rows.append(text_row("BNN full: Bayesian linears (attn1 q/k/v/out, ff)", f"{len(names_r)} layers",
                                 f"{len(names_o)} layers" + ("" if names_o == names_r else " (other names)"),
                                 note="the same module names"))  # fmt: skip
            theirs, mine = [], []
            for name, params in released["converted"].items():
                layer = ours_layers[name]
                theirs += [params["mu_weight"], params["sigma_weight"], params.get("mu_bias"), params.get("sigma_bias")]
                mine += [layer.weight_mu, layer.weight_sigma, layer.bias_mu, layer.bias_sigma]
            rows.append(tensor_row("BNN full: mu and sigma after conversion (all Bayesian elements)",
                                   flat(theirs), flat(mine)))  # fmt: skip
        copy_full(module, released["initial"])
        ours = our_step(module, released["pixel_values"], released["tape"])
        r_unet, o_unet = released["unet"][0], ours["unet"][0]
        if kl_weight == 0:
            rows.append(tensor_row("BNN full: text states of the batch", r_unet["context"], o_unet["context"]))
            rows.append(tensor_row("BNN full: noisy latents x_t", r_unet["x_t"], o_unet["x_t"]))
            rows.append(text_row("BNN full: timesteps", r_unet["t"].tolist(), o_unet["t"].tolist()))
        rows.append(tensor_row(f"BNN full, {tag}: UNet output", r_unet["prediction"], o_unet["prediction"],
                               tol=1e-5, reason=BOTH))  # fmt: skip
        instance, prior = released["mse"][:2]
        rows.append(compare(f"BNN full, {tag}: instance loss", instance, ours["loss/instance"],
                            tol=LOSS_RTOL * abs(instance), reason=BOTH))  # fmt: skip
        rows.append(compare(f"BNN full, {tag}: prior loss", prior, ours["loss/prior"],
                            tol=LOSS_RTOL * abs(prior), reason=BOTH))  # fmt: skip
        kl_r, kl_o = released["kl"], ours["loss/kl"]
        elements = sum(layer.num_bayesian for layer in ours_layers.values())
        rows.append(compare(f"BNN full, {tag}: KL (kl_form released, sum)", kl_r, kl_o,
                            tol=max(1e-5 * abs(kl_r), 1e-7 * elements),
                            reason="float32 vs float64 prior sigma, other operation order"))  # fmt: skip
        total = released["loss"]
        rows.append(compare(f"BNN full, {tag}: total loss", total, ours["loss"], tol=LOSS_RTOL * abs(total),
                            reason=BOTH))  # fmt: skip
        copy_full(module, released["initial"])
        diagnostics = [("the released latent layout and weight sample", {"channels_last": True, "two_rounding": True},
                        0.0)]  # fmt: skip
        if kl_weight == 0:
            diagnostics.insert(0, ("the released latent layout (channels-last)", {"channels_last": True}, 1e-5))
        for label, options, bound in diagnostics:
            copy_full(module, released["initial"])
            diagnostic = our_step(module, released["pixel_values"], released["tape"], **options)
            rows.append(tensor_row(f"BNN full, {tag}: UNet output, ours with {label} (diagnostic)",
                                   r_unet["prediction"], diagnostic["unet"][0]["prediction"], tol=bound,
                                   reason=SAMPLE))  # fmt: skip
            rows.append(compare(f"BNN full, {tag}: total loss, ours with {label} (diagnostic)", total,
                                diagnostic["loss"], tol=LOSS_RTOL * abs(total) if bound else 0.0,
                                reason=SAMPLE))  # fmt: skip
    return rows, first


class ReleasedLoRAProjection(torch.nn.Module):
    """A projection plus a released ``LoRARandLinearLayer``: ``base(x) + lora(x)``, as diffusers' old
    ``LoRAAttnProcessor`` (scale 1) computed ``attn.to_q(h) + self.to_q_lora(h)`` (and k, v, out)."""

    def __init__(self, base: torch.nn.Module, lora: torch.nn.Module):
        super().__init__()
        self.base, self.lora = base, lora

    def forward(self, hidden_states, *args, **kwargs):
        return self.base(hidden_states) + self.lora(hidden_states)


LORA_SLOTS = (("to_q", "to_q_lora"), ("to_k", "to_k_lora"), ("to_v", "to_v_lora"), ("to_out.0", "to_out_lora"))


def run_released_bnn_lora(path: Path, folder: Path, data: Path, out: Path, batch: dict, kl_weight: float,
                          perturb: bool) -> dict:  # fmt: skip
    """The released LoRA recipe's conversion, KL and training-step statements on the tiny UNet (its ``main``
    cannot run: see the module docstring)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders import AttnProcsLayers
    from diffusers.models.lora import LoRALinearLayer
    from transformers import CLIPTextModel

    record: dict = {"mse": []}
    source = ReleasedSource(path / "train_dreambooth_bayes_lora.py")
    main = source.function("main")
    with released_imports(path), cuda_calls_on_cpu():
        script = import_file(source.path, "released_train_dreambooth_bayes_lora")
        bayesian = sys.modules["bayesian_lora"]
        cpu_torch = CPUTorch()
        script.torch = bayesian.torch = cpu_torch
        args = script.parse_args([*bnn_argv(folder, data, out, kl_weight), "--convert_attn2"])
        try:  # what the released script calls, for the record
            script.LoRAAttnProcessor(hidden_size=8, cross_attention_dim=None)
            record["drift"] = None
        except TypeError as error:
            record["drift"] = f"LoRAAttnProcessor(hidden_size=..., cross_attention_dim=...): TypeError: {error}"
        torch.manual_seed(args.seed)
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").requires_grad_(False)
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae").requires_grad_(False)
        text_encoder = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder").requires_grad_(False)
        noise_scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
        processors = {}
        for name in unet.attn_processors:
            attention = unet.get_submodule(name.rsplit(".processor", 1)[0])
            host = torch.nn.Module()
            for slot, lora in LORA_SLOTS:
                linear = attention.get_submodule(slot)
                setattr(host, lora, LoRALinearLayer(linear.in_features, linear.out_features, rank=4))
            processors[name] = host
        # The released conversion loop and prior mean, executed as written.
        namespace = {"lora_attn_procs": processors, "bayesian": bayesian, "args": args, "torch": cpu_torch}
        with quiet():
            source.run(source.find(ast.For, "bayesian.convert(lora_attn_procs[key]", within=main), namespace)
        source.run(source.find(ast.Assign, "prior_mu = ", within=main), namespace)
        processors = namespace["lora_attn_procs"]
        for name, host in processors.items():
            attention = unet.get_submodule(name.rsplit(".processor", 1)[0])
            for slot, lora in LORA_SLOTS:
                parent, _, child = slot.rpartition(".")
                owner = attention.get_submodule(parent) if parent else attention
                setattr(owner, child, ReleasedLoRAProjection(attention.get_submodule(slot), getattr(host, lora)))
        lora_layers = AttnProcsLayers(processors)
        layers = {f"{name.rsplit('.processor', 1)[0]}.{slot}": getattr(host, lora)
                  for name, host in processors.items() for slot, lora in LORA_SLOTS}  # fmt: skip
        if perturb:
            perturb_posterior([(layer.up.mu_weight, layer.up.sigma_weight) for layer in layers.values()])
        record["initial"] = {name: {"down": layer.down.weight.detach().clone(),
                                    "mu": layer.up.mu_weight.detach().clone(),
                                    "sigma": layer.up.sigma_weight.detach().clone()}
                             for name, layer in layers.items()}  # fmt: skip
        with torch.no_grad():
            kl = bayesian.cal_KL_modules(lora_layers, namespace["prior_mu"], prior_sigma=torch.tensor(args.prior_sigma))
        record["kl"] = float(kl)
        # The training step's statements up to the backward pass, executed as written.
        block = source.find(ast.With, "accelerator.accumulate(unet)", within=main)
        step = []
        for statement in block.body:
            if "accelerator.backward(" in source.source(statement):
                break
            step.append(statement)
        mse = torch.nn.functional.mse_loss

        def recorded_mse(*a, **k):
            value = mse(*a, **k)
            record["mse"].append(float(value.detach()))
            return value

        unet.train()
        scope = {"batch": batch, "vae": vae, "weight_dtype": torch.float32, "noise_scheduler": noise_scheduler,
                 "text_encoder": text_encoder, "unet": unet, "args": args, "torch": cpu_torch,
                 "F": types.SimpleNamespace(mse_loss=recorded_mse), "bayesian": bayesian,
                 "lora_layers": lora_layers, "prior_mu": namespace["prior_mu"]}  # fmt: skip
        tape = RandomTape()
        spy = Spy(UNet2DConditionModel, unet_call)
        spy.active = True
        with spy.installed(), tape.recording():
            source.run(step, scope)
        record["loss"] = float(scope["loss"].detach())
        record["step_kl"] = float(scope["loss2"].detach()) if "loss2" in scope else None
    record["tape"], record["unet"] = tape, spy.calls
    return record


def copy_lora(module, initial: dict) -> None:
    from lightning_ft.nn.bayesian import bayesian_layers

    layers = bayesian_layers(module.denoiser)
    with torch.no_grad():
        for name, params in initial.items():
            peft_layer = module.denoiser.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(params["down"])
            up = layers[f"{name}.lora_B.default"]
            up.weight_mu.copy_(params["mu"])
            up.weight_sigma.copy_(params["sigma"])


def bnn_lora_rows(path: Path, folder: Path, data: Path, work: Path, full: dict) -> tuple[list[Row], str | None]:
    rows: list[Row] = []
    pixels = full["pixel_values"]
    input_ids = full["input_ids"][0]
    batch = {"pixel_values": pixels, "input_ids": input_ids}
    drift = None
    for kl_weight, perturb in ((0.0, False), (KL_WEIGHT, True)):
        tag = "KL off (weight 0, released)" if kl_weight == 0 else f"KL on (weight {kl_weight:g}, perturbed q)"
        released = run_released_bnn_lora(path, folder, data, work / f"lora_{kl_weight:g}", batch, kl_weight, perturb)
        drift = released["drift"]
        module = our_bnn(folder, "lora", kl_weight, released["initial"], copy_lora)
        if kl_weight == 0:
            rows.append(text_row("BNN LoRA: Bayesian up matrices (q/k/v/out of attn1 and attn2)",
                                 f"{len(released['initial'])} layers",
                                 f"{len(module.bayesian_names)} layers"))  # fmt: skip
        ours = our_step(module, pixels, released["tape"])
        rows.append(tensor_row(f"BNN LoRA, {tag}: UNet output", released["unet"][0]["prediction"],
                               ours["unet"][0]["prediction"], tol=1e-5, reason=BOTH))  # fmt: skip
        instance, prior = released["mse"][:2]
        rows.append(compare(f"BNN LoRA, {tag}: instance loss", instance, ours["loss/instance"],
                            tol=LOSS_RTOL * abs(instance), reason=BOTH))  # fmt: skip
        rows.append(compare(f"BNN LoRA, {tag}: prior loss", prior, ours["loss/prior"],
                            tol=LOSS_RTOL * abs(prior), reason=BOTH))  # fmt: skip
        rows.append(compare(f"BNN LoRA, {tag}: KL (released cal_KL_modules vs kl_form released, sum)",
                            released["kl"], ours["loss/kl"], tol=max(1e-5 * abs(released["kl"]), 1e-9),
                            reason="float32 vs float64 prior sigma, other operation order"))  # fmt: skip
        total = released["loss"]
        rows.append(compare(f"BNN LoRA, {tag}: total loss", total, ours["loss"], tol=LOSS_RTOL * abs(total),
                            reason=BOTH))  # fmt: skip
        copy_lora(module, released["initial"])
        diagnostic = our_step(module, pixels, released["tape"], channels_last=True, two_rounding=True)
        label = "ours with the released latent layout and weight sample (diagnostic)"
        rows.append(tensor_row(f"BNN LoRA, {tag}: UNet output, {label}", released["unet"][0]["prediction"],
                               diagnostic["unet"][0]["prediction"]))  # fmt: skip
        rows.append(compare(f"BNN LoRA, {tag}: total loss, {label}", total, diagnostic["loss"]))
    return rows, drift


def bnn_rows(path: Path, work: Path) -> tuple[list[Row], list[str]]:
    """Every BNN row, and notes for the table."""
    data = work / "bnn_data"
    write_images(data / "instance", BATCH, seed=0)
    write_images(data / "class", BATCH, seed=1)
    folder = write_tiny_sd(work / "tiny_sd")
    rows, full = bnn_full_rows(path, folder, data, work)
    lora_rows, drift = bnn_lora_rows(path, folder, data, work, full)
    notes = [
        "BNN: `train_dreambooth_bayes.py` ran one step in-process (its `main`, the flags of "
        "`run_scripts_bayes_dreambooth.sh` on a tiny Stable Diffusion folder of `configs/model/tiny_t2i.yaml`, "
        f"{BATCH} instance + {BATCH} class images of {RESOLUTION} px; `.cuda()` and `device='cuda'` made no-ops). "
        "Every random draw of that step was recorded and replayed into `BayesianFineTuning`; the KL-on rows perturb "
        "the released posterior after conversion (mu += 0.01 N(0,1), sigma *= exp(N(0,1)/2), seeded) and copy it "
        "into ours.",
        "BNN LoRA: `train_dreambooth_bayes_lora.py` cannot run on this diffusers: "
        f"{drift or 'its LoRAAttnProcessor call'}. Its conversion loop, prior mean and training-step statements "
        "(up to the backward pass) were executed from the checkout on the tiny UNet, with its `LoRARandLinearLayer` "
        "added to each q/k/v/out projection (output = W x + up(down(x)), the old processor at scale 1); its down "
        "matrices and up mu/sigma were copied into lightning-ft's PEFT LoRA. The released script computes the KL "
        "only when its weight is > 0; the KL rows call its `cal_KL_modules` in both cases.",
    ]
    return rows + lora_rows, notes


# ---------------------------------------------------------------------------------------------- Diff-Tuning
def released_train(path: Path, released_models) -> tuple[ReleasedSource, argparse.Namespace]:
    """``train.py``'s source and its argparse defaults (the ``__main__`` block's parser, parsed without flags but
    the required ``--data-path``)."""
    source = ReleasedSource(path / "train.py")
    block = source.find(ast.If, "__name__", "ArgumentParser")
    statements = [s for s in block.body if "parse_args(" not in source.source(s) and "main(" not in source.source(s)]
    dit_models = getattr(released_models, "DiT_models", None) or {"DiT-XL/2": None}
    namespace = source.run(statements, {"argparse": argparse, "DiT_models": dit_models})
    args = namespace["parser"].parse_args(["--data-path", "target_images"])
    return source, args


def ks_distance(a: torch.Tensor, b: torch.Tensor, support: int) -> float:
    ca = torch.bincount(a, minlength=support).cumsum(0).double() / len(a)
    cb = torch.bincount(b, minlength=support).cumsum(0).double() / len(b)
    return (ca - cb).abs().max().item()


def our_diff_tuning(bank: torch.Tensor | None = None):
    from lightning_ft.methods import DiffTuning

    torch.manual_seed(0)
    module = DiffTuning(components=tiny_components("tiny_dit"), sample_steps=2, memory_size=BANK)
    if bank is not None:
        module.memory_bank = bank
    return module.train()


class BankIndex:
    """Identifies drawn memory images: which bank image (uint8 (N, 3, H, W)) each is, whether mirrored, and its max
    abs pixel difference to that image taken as floats in [-1, 1] (bank images are distinct, also when mirrored)."""

    def __init__(self, bank: torch.Tensor):
        self.reference = bank.float() / 127.5 - 1.0
        self.lookup = {}
        for i, image in enumerate(bank):
            self.lookup[image.numpy().tobytes()] = (i, False)
            self.lookup[image.flip(-1).numpy().tobytes()] = (i, True)

    def __call__(self, drawn: torch.Tensor) -> list[tuple[int, bool, float]]:
        found = []
        for image in drawn.float().cpu():
            key = ((image + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy().tobytes()
            i, mirrored = self.lookup[key]
            reference = self.reference[i].flip(-1) if mirrored else self.reference[i]
            found.append((i, mirrored, (reference - image).abs().max().item()))
        return found


def diff_tuning_rows(path: Path, work: Path) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes: list[str] = []
    with released_imports(path):
        try:
            import models as released_models  # noqa: F401 - the checkout's DiT (needs timm)
        except ImportError as error:
            released_models = None
            notes.append(f"Diff-Tuning `models.py` could not be imported ({error}): its label rows are left out.")
        diffusion = importlib.import_module("diffusion")
        source, args = released_train(path, released_models)
        main = source.function("main")
        module = our_diff_tuning()
        T = module.noise_process.num_train_timesteps
        from lightning_ft.methods.diff_tuning import power_law_pmf

        # 1. The two timestep distributions (released: main's own statements).
        scope = {"args": args, "torch": torch}
        pmf_statements = [source.find(ast.If, "args.LWF_prob_scale = args.prob_scale", within=main)]
        for name in ("probs", "rev_probs"):
            pmf_statements += [n for n in main.body if isinstance(n, ast.Assign) and assigned_name(n) == name]
        pmf_statements += [source.find(ast.Assign, "categorical_dist = torch", within=main)]
        pmf_statements += [source.find(ast.Assign, "rev_categorical_dist = ", within=main)]
        pmf_statements.sort(key=lambda n: n.lineno)
        source.run(pmf_statements, scope)
        a, b = args.prob_scale, args.LWF_prob_scale
        psi = power_law_pmf(T, module.hparams.target_power)
        xi = power_law_pmf(T, module.hparams.target_power if module.hparams.memory_power is None
                           else module.hparams.memory_power, decreasing=True)  # fmt: skip
        memory_power = module.hparams.memory_power
        rows.append(text_row("Diff-Tuning: default powers a (target), b (memory; released LWF_prob_scale -1 and ours "
                             "memory_power None both mean b = a)", f"a={a:g}, b={b:g}",
                             f"a={module.hparams.target_power:g}, b={a if memory_power is None else memory_power:g}"))
        rows.append(tensor_row("Diff-Tuning: p_psi(t) ∝ (t+1)^a over t = 0..T-1", scope["probs"], psi, tol=1e-9,
                               reason="released normalises in float32, ours in float64"))  # fmt: skip
        rows.append(tensor_row("Diff-Tuning: p_xi(t) ∝ (T-t)^b over t = 0..T-1", scope["rev_probs"], xi, tol=1e-9,
                               reason="released normalises in float32, ours in float64"))  # fmt: skip

        # 2. Timestep draws: the released loop's own sampling statement vs our sample_timesteps / memory_timesteps.
        draw = source.find(ast.If, "t = categorical_dist.sample(", within=main)
        torch.manual_seed(0)
        drawn = source.run(draw, {**scope, "x": torch.empty(DRAWS), "x_s": torch.empty(DRAWS), "device": "cpu"})
        torch.manual_seed(0)  # ours drawn in the released statement's order: target, then memory
        t_target = module.sample_timesteps(DRAWS).cpu()
        t_memory = module.memory_timesteps(DRAWS).cpu()
        for label, released_t, ours_t, pmf in (("target t ~ p_psi", drawn["t"], t_target, psi),
                                               ("memory t ~ p_xi", drawn["t_s"], t_memory, xi)):  # fmt: skip
            support = torch.arange(T, dtype=torch.float64)
            mean = float((pmf * support).sum())
            sd = math.sqrt(float((pmf * (support - mean) ** 2).sum()))
            bound = 4 * sd * math.sqrt(2 / DRAWS)
            rows.append(compare(f"Diff-Tuning: mean of {DRAWS} draws of {label} (exact {mean:.2f})",
                                released_t.double().mean(), ours_t.double().mean(), tol=bound,
                                reason="4 standard errors of a difference of two sample means"))  # fmt: skip
            ks = ks_distance(released_t.long(), ours_t.long(), T)
            critical = 1.95 * math.sqrt(2 / DRAWS)  # two-sample KS at alpha = 0.001
            verdict = compare("", 0.0, ks, tol=critical, reason="two-sample KS critical value at alpha 0.001").verdict
            rows.append(Row(f"Diff-Tuning: KS distance between the released and our draws of {label}", "-", "-",
                            f"{ks:.3g}", verdict))  # fmt: skip
            same = float((released_t.long() == ours_t.long()).double().mean())
            rows.append(text_row(f"Diff-Tuning: draws of {label} from the same seed", "seed 0",
                                 f"{100 * same:.3f}% of them equal",
                                 known="draw by draw only: released torch.distributions.Categorical over float32 "
                                       "probabilities, ours torch.multinomial over float64; the distributions are "
                                       "equal (rows above); kept"))  # fmt: skip

        # 3. The memory / target split of a batch, and 4. the memory images.
        bank_images = write_images(work / "dt" / "pretrained_images" / "0", BANK, seed=7)
        write_images(work / "dt" / "target_images" / "0", 4, seed=8)
        bank = torch.from_numpy(np.stack(bank_images)).permute(0, 3, 1, 2).contiguous()
        module.memory_bank = bank
        args.image_size, args.num_workers = RESOLUTION, 0
        crop = next(n for n in source.tree.body if isinstance(n, ast.FunctionDef) and n.name == "center_crop_arr")
        from PIL import Image
        from torch.utils.data import DataLoader
        from torchvision import transforms
        from torchvision.datasets import ImageFolder

        loader_scope = source.run(crop, {"np": np, "Image": Image})
        loader_scope.update(args=args, transforms=transforms, ImageFolder=ImageFolder, DataLoader=DataLoader,
                            print=lambda *a, **k: None, torch=torch)  # fmt: skip
        source.run(source.find(ast.Assign, "transform = transforms.Compose(", within=main), loader_scope)
        first_batch = source.find(ast.Assign, within=main, exact="batch_size = int(args.global_batch_size)")
        lwf_block = source.find(ast.If, "lwf_loader = DataLoader(", within=main)
        for size in (32, 16, 10, 4):
            args.global_batch_size = size
            try:
                with contextlib.chdir(work / "dt"):
                    source.run([first_batch, lwf_block], loader_scope)
                released_split = f"{loader_scope['lwf_batch_size']} memory + {loader_scope['batch_size']} target"
            except ValueError as error:
                released_split = f"error: {str(error).splitlines()[0]}"
            k = module.memory_count(size)
            ours_split = f"{k} memory + {max(1, size - k)} target"
            known = None
            if size * module.hparams.memory_ratio < 1:
                known = ("int(batch x 0.2) is 0 and the released memory DataLoader refuses batch_size 0; ours takes "
                         "at least one memory image (documented inferred choice; kept)")  # fmt: skip
            rows.append(text_row(f"Diff-Tuning: batch of {size}: memory + target images", released_split,
                                 ours_split, known=known))  # fmt: skip

        args.global_batch_size = 32
        with contextlib.chdir(work / "dt"):
            source.run([first_batch, lwf_block], loader_scope)
            source.run(source.find(ast.Assign, "lwf_iter = iter(lwf_loader)", within=main), loader_scope)
            fetch = source.find(ast.Try, "next(lwf_iter)", within=main)
            k = loader_scope["lwf_batch_size"]
            torch.manual_seed(0)
            released_draws = []
            for _ in range(MEMORY_STEPS):
                source.run(fetch, loader_scope)
                released_draws.append(loader_scope["x_s"])
        ours_draws = []
        for step in range(MEMORY_STEPS):
            with patched(type(module), "global_step", property(lambda self, s=step: s)):
                ours_draws.append(module.draw_memory(k, (RESOLUTION, RESOLUTION)))
        stats = {}
        identify = BankIndex(bank)
        for name, draws in (("released", released_draws), ("ours", ours_draws)):
            ids, flips, worst, duplicates = [], 0, 0.0, 0
            for images in draws:
                found = identify(images)
                step_ids = [i for i, _, _ in found]
                duplicates += len(step_ids) - len(set(step_ids))
                ids += step_ids
                flips += sum(f for _, f, _ in found)
                worst = max(worst, max(d for _, _, d in found))
            counts = np.bincount(ids, minlength=BANK)
            epoch = BANK // k
            distinct = [len(set(ids[i * k:(i + epoch) * k])) for i in range(0, MEMORY_STEPS - epoch, epoch)]
            stats[name] = {"flip": flips / len(ids), "worst": worst, "dup": duplicates, "counts": counts,
                           "distinct": float(np.mean(distinct))}  # fmt: skip
        expected = MEMORY_STEPS * k / BANK
        rows.append(text_row(f"Diff-Tuning memory: images per step at batch 32, repeats within a step "
                             f"({MEMORY_STEPS} steps)", f"{k}, {stats['released']['dup']} repeats",
                             f"{k}, {stats['ours']['dup']} repeats"))  # fmt: skip
        rows.append(text_row(f"Diff-Tuning memory: draws per bank image over {MEMORY_STEPS} steps, min-max "
                             f"(expected {expected:.1f})",
                             f"{stats['released']['counts'].min()}-{stats['released']['counts'].max()}",
                             f"{stats['ours']['counts'].min()}-{stats['ours']['counts'].max()}",
                             known="both uniform over the bank; the released loader cycles a shuffled bank (each "
                                   "image once per pass, drop_last), ours draws each step independently "
                                   "(seeded by step, micro-batch and rank: resumable, distinct across ranks; "
                                   "documented inferred choice; kept)"))  # fmt: skip
        rows.append(compare(f"Diff-Tuning memory: distinct images in {BANK // k} consecutive steps (one pass of "
                            f"the released loader; mean)", stats["released"]["distinct"], stats["ours"]["distinct"],
                            known="see the row above: without replacement over a pass vs per step"))  # fmt: skip
        drawn = MEMORY_STEPS * k  # images drawn by each code: each flipped with p = 0.5
        rows.append(compare("Diff-Tuning memory: share of memory images flipped horizontally",
                            stats["released"]["flip"], stats["ours"]["flip"], tol=4 * math.sqrt(2 * 0.25 / drawn),
                            reason="4 standard errors of a difference of two p = 0.5 shares; another random stream",
                            known="the released memory loader reuses the target images' transform, "
                                  "RandomHorizontalFlip (p = 0.5) included; ours flips with model.memory_flip "
                                  "(default true, as released)"))  # fmt: skip
        rows.append(compare("Diff-Tuning memory: pixels of an identified image, max abs diff to the bank image",
                            stats["released"]["worst"], stats["ours"]["worst"], tol=1e-6,
                            reason="(x/255 - 0.5)/0.5 vs x/127.5 - 1 in float32"))  # fmt: skip

        # 5. Labels: the released DiT.forward's label branch vs ours.
        if released_models is not None:
            rows += label_rows(released_models, module)

        # 6. The loss terms on one batch with the same network, latents, noise, timesteps and labels.
        rows += loss_rows(source, main, diffusion, module, scope, args)
    notes.append(
        "Diff-Tuning: `train.py` asserts CUDA, so its statements were executed from the checkout instead of its "
        "`main`: the parser (released defaults), the two timestep distributions and the loop's timestep draw, the "
        f"batch split and memory `DataLoader` (`ImageFolder('pretrained_images')`: {BANK} images of {RESOLUTION} px, "
        "`image_size` set to 32 and `num_workers` to 0) with its `next(lwf_iter)` fetch, and the combination of "
        "the two losses. `GaussianDiffusion.training_losses` (from `create_diffusion(timestep_respacing=\"\")`) ran "
        "with lightning-ft's tiny DiT (`configs/model/tiny_dit.yaml`, learned sigma) as the network, on the latents, "
        "noise, timesteps and labels of one `DiffTuning` step (batch 10: 8 target + 2 memory images).",
    )
    notes.append(
        "Not compared: the memory banks themselves (the released bank is an image folder the user samples "
        "beforehand, of a size the code does not set; lightning-ft samples its own, `memory_size` 256 by default), "
        "the released DiT network (lightning-ft's DiT is diffusers' `DiTTransformer2DModel`; the loss rows give both "
        "codes the same network), and the target images' augmentation (a data-module setting).",
    )
    return rows, notes


def assigned_name(node: ast.Assign) -> str | None:
    target = node.targets[0]
    return target.id if isinstance(target, ast.Name) else None


class _Stop(Exception):
    pass


def label_rows(released_models, module) -> list[Row]:
    """The labels the released ``DiT.forward`` embeds for a step of 26 target + 6 memory images (its own
    ``LabelEmbedder`` and label branch; the network after it is not run), over many steps."""
    dropout = inspect.signature(released_models.DiT.__init__).parameters["class_dropout_prob"].default
    seen = []

    class Table(torch.nn.Embedding):
        def forward(self, labels):
            seen.append(labels.clone())
            return torch.zeros(len(labels), 1)

    with quiet():  # its constructor prints
        embedder = released_models.LabelEmbedder(1000, 1, dropout)
    embedder.embedding_table = Table(1001, 1)

    def stop(_):
        raise _Stop

    stub = types.SimpleNamespace(training=True, y_embedder=embedder, x_embedder=stop)
    n, k, steps = 26, 6, 2000
    torch.manual_seed(0)
    y = torch.randint(0, 1000, (n + k,))
    for _ in range(steps):
        try:
            released_models.DiT.forward(stub, torch.zeros(n + k), torch.zeros(n + k), y, y_embed_split=[n, k])
        except _Stop:
            pass
    labels = torch.stack(seen)
    released_memory_null = float((labels[:, n:] == 1000).double().mean())
    released_drop = float((labels[:, :n] == 1000).double().mean())
    # Ours: memory rows get the null condition; target rows the configured condition dropout.
    null = module.family.null_class
    classes = torch.as_tensor(module.family.classes())
    target_labels = classes[torch.arange(n) % len(classes)]
    memory = module.null_condition(k).fields["class_labels"].cpu()
    default = module.hparams.condition_dropout

    def our_drop_rate(p: float) -> float:
        module.hparams.condition_dropout = p
        try:
            torch.manual_seed(0)
            rates, batch = [], {"class_labels": target_labels, "pixel_values": torch.zeros(n, 3, 1, 1)}
            for _ in range(steps):
                labels = module.encode_conditions(batch).fields["class_labels"].cpu()
                rates.append((labels == null).double().mean())
            return float(torch.stack(rates).mean())
        finally:
            module.hparams.condition_dropout = default

    se = math.sqrt(dropout * (1 - dropout) / (steps * n))
    return [
        compare("Diff-Tuning labels: share of memory rows given the null class", released_memory_null,
                float((memory == null).double().mean())),
        compare(f"Diff-Tuning labels: share of target labels dropped to the null class ({steps} steps of {n}; ours "
                f"at its default condition_dropout {default:g})", released_drop, our_drop_rate(default), tol=4 * se,
                reason="4 standard errors",
                known=f"the released DiT drops target labels with p = {dropout:g} in training (class_dropout_prob); "
                      "DiffTuning has no label dropout unless model.condition_dropout is set (its default 0 suits "
                      "every family, text models included); experiments/dit/diff_tuning.yaml sets 0.1, as "
                      "released (next row)"),
        compare(f"Diff-Tuning labels: the same, ours with model.condition_dropout {dropout:g}", released_drop,
                our_drop_rate(dropout), tol=4 * se, reason="4 standard errors; another random stream"),
    ]  # fmt: skip


def loss_rows(source: ReleasedSource, main, diffusion, module, scope: dict, args) -> list[Row]:
    rows: list[Row] = []
    size = 10
    k = module.memory_count(size)
    n = size - k
    torch.manual_seed(3)
    classes = module.family.classes()
    batch = {"pixel_values": torch.rand(size, 3, RESOLUTION, RESOLUTION) * 2 - 1,
             "class_labels": torch.tensor([classes[i % len(classes)] for i in range(size)])}  # fmt: skip
    seen: dict = {}
    diffusion_loss, make_noise = module.diffusion_loss, module.make_noise

    def recorded_loss(x0, condition, timesteps=None, *a, **kw):
        seen.update(x0=x0.detach().clone(), t=timesteps.clone(), labels=condition.fields["class_labels"].clone())
        value = diffusion_loss(x0, condition, timesteps, *a, **kw)
        seen["per_sample"] = value.detach().clone()
        return value

    def recorded_noise(x0):
        seen["noise"] = make_noise(x0).detach().clone()
        return seen["noise"]

    module.diffusion_loss, module.make_noise = recorded_loss, recorded_noise
    try:
        loss, logs = module.training_loss(batch)
    finally:
        del module.diffusion_loss, module.make_noise
    namespace = source.run(source.find(ast.Assign, "create_diffusion(", within=main),
                           {"create_diffusion": diffusion.create_diffusion})  # fmt: skip
    gaussian = namespace["diffusion"]
    labels = seen["labels"]

    def network(x, t, y=None, **_):
        return module.denoiser(x, t, class_labels=labels).sample

    with torch.no_grad():
        terms = gaussian.training_losses(network, seen["x0"], seen["t"], {"y": labels}, noise=seen["noise"])
    released_abar = torch.from_numpy(gaussian.alphas_cumprod)
    ours_abar = module.noise_process.scheduler.alphas_cumprod
    rows.append(tensor_row("Diff-Tuning: alpha-bar schedule (linear betas)", released_abar, ours_abar, tol=1e-6,
                        reason="released float64, diffusers float32"))  # fmt: skip
    x_t_released = gaussian.q_sample(seen["x0"], seen["t"], noise=seen["noise"])
    x_t_ours = module.noise_process.add_noise(seen["x0"], seen["noise"], seen["t"])
    rows.append(tensor_row("Diff-Tuning: noisy latents x_t", x_t_released, x_t_ours, tol=1e-5,
                           reason="the schedule's float64 vs float32 coefficients"))  # fmt: skip
    mse, vb = terms["mse"], terms["vb"]
    reconsolidation, retention = float(logs["loss/reconsolidation"]), float(logs["loss/retention"])
    rows.append(compare("Diff-Tuning: reconsolidation term (target rows' eps-MSE)", mse[:n].mean(),
                        reconsolidation, tol=1e-5 * abs(reconsolidation),
                        reason="x_t from float64 vs float32 coefficients"))  # fmt: skip
    rows.append(compare("Diff-Tuning: retention term (memory rows' eps-MSE)", mse[n:].mean(), retention,
                        tol=1e-5 * abs(retention), reason="x_t from float64 vs float32 coefficients"))  # fmt: skip
    combine = source.find(ast.If, "torch.split(loss", within=main)

    def released_total(per_sample: torch.Tensor) -> float:
        local = {"loss": per_sample, "batch_size": n, "lwf_batch_size": k, "args": args, "torch": torch,
                 "running_loss": 0.0, "running_loss_s": 0.0}  # fmt: skip
        return float(source.run(combine, local)["loss"])

    rows.append(compare("Diff-Tuning: total, released combination of its eps-MSE terms (LWF_weight 0.1)",
                        released_total(mse), float(loss), tol=1e-5 * abs(float(loss)),
                        reason="x_t from float64 vs float32 coefficients"))  # fmt: skip
    rows.append(Row("Diff-Tuning: vb term (learned variance), mean over the batch", fmt(vb.mean()), "not computed",
                    "-", "differs: the released loss is mse + vb (DiT's hybrid loss: vb trains the learned-variance "
                         "channels); DiffTuning trains the eps-MSE only, as every method here: the samplers and "
                         "pipelines used here read the mean half of a learned-variance output and discard the "
                         "variance half, so those channels are never sampled; ours kept"))  # fmt: skip
    rows.append(compare("Diff-Tuning: total, released (mse + vb terms) vs ours", released_total(terms["loss"]),
                        float(loss), known="the vb term (row above)"))  # fmt: skip
    return rows


# ---------------------------------------------------------------------------------------------------- main
def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "torchvision", "timm", "lightning-ft"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def run(bnn: Path | None, diff_tuning: Path | None, out: Path) -> tuple[list[Row], Path]:
    """Every comparison for the given checkouts (checked first), written to ``out``."""
    bnn = check_checkout(bnn, "bnn") if bnn is not None else None
    diff_tuning = check_checkout(diff_tuning, "diff_tuning") if diff_tuning is not None else None
    start = time.time()
    rows: list[Row] = []
    notes: list[str] = []
    checkouts = {}
    with tempfile.TemporaryDirectory(prefix="released_parity_") as tmp:
        work = Path(tmp)
        if bnn is not None:
            checkouts[CHECKOUTS["bnn"][0]] = checkout_commit(bnn)
            more, text = bnn_rows(bnn, work)
            rows, notes = rows + more, notes + text
        if diff_tuning is not None:
            checkouts[CHECKOUTS["diff_tuning"][0]] = checkout_commit(diff_tuning)
            more, text = diff_tuning_rows(diff_tuning, work)
            rows, notes = rows + more, notes + text
    flags = " ".join(f"{FLAGS[n]} PATH" for n, p in (("bnn", bnn), ("diff_tuning", diff_tuning)) if p is not None)
    meta = {"command": f"python -m benchmarks.released_parity {flags}", "versions": versions(),
            "checkouts": checkouts, "seconds": time.time() - start, "notes": notes}  # fmt: skip
    return rows, write_report(rows, out, meta)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bnn", type=Path, help="a checkout of Nicholas0228/BNN-Finetuning-DMs")
    parser.add_argument("--diff-tuning", type=Path, help="a checkout of thuml/Diffusion-Tuning")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.bnn is None and args.diff_tuning is None:
        parser.error("give --bnn PATH and/or --diff-tuning PATH (checkouts of the released repositories)")
    try:
        for path, which in ((args.bnn, "bnn"), (args.diff_tuning, "diff_tuning")):
            if path is not None:
                check_checkout(path, which)
    except ValueError as error:
        parser.error(str(error))
    print(f"released_parity: expected time {EXPECTED_TIME}", flush=True)
    rows, out = run(args.bnn, args.diff_tuning, args.out)
    print(out.read_text())
    bad = unexplained(rows)
    if bad:
        print(f"released_parity: {len(bad)} unexplained difference(s)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
