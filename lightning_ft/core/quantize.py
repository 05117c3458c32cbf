"""A quantised frozen base (``model.quantize``): a LoRA trained over low-bit frozen weights, as QLoRA does.

``none`` | ``int8`` | ``nf4`` | ``fp8``. What is quantised: the weight of every ``nn.Linear`` of the denoiser (the
base layers the LoRA wraps and the other linears: all of them are frozen under a LoRA), of each frozen text encoder,
and of a method's frozen teacher (``frozen_denoiser``, quantised like the student's base so that the two agree at
step 0). Convolutions, norms, embeddings, biases and the VAE stay as loaded (``frozen_dtype`` still applies to
them): torchao's weight-only formats are made for linear layers, and the VAE is a convolution network.

Library: torchao (tested with 0.18.0, the ``quant`` extra), the one maintained library that has all three formats
and runs them on the CPU (bitsandbytes 0.50's int8 and nf4 layers also ran here under a PEFT LoRA, but it has no
fp8 weight format). Each format is torchao's own:

- ``int8``: ``Int8WeightOnlyConfig``: int8 weights with one scale per output channel (``Int8Tensor``);
- ``fp8``: ``Float8WeightOnlyConfig``: float8_e4m3fn weights with one scale per row (``Float8Tensor``). torchao
  computes the matmul in the original precision, so this is a storage format and needs no fp8 kernel;
- ``nf4``: ``NF4Tensor``, QLoRA's 4-bit NormalFloat in blocks of 64 with double-quantised block scales (the tensor
  torchtune's QLoRA uses). torchao has no ``quantize_`` config for it: each weight is converted with ``to_nf4``.

The LoRA goes on top through PEFT, as without quantisation: int8 and fp8 weights are ``TorchAOBaseTensor``s, for
which PEFT inserts its ``TorchaoLoraLinear``; ``NF4Tensor`` is not one, and PEFT wraps such a layer in its plain
``lora.Linear``, whose forward calls the base layer (``F.linear``, which ``NF4Tensor`` implements with a backward to
the input). Both train the LoRA. Neither merges into this base: PEFT's torchao merge needs the requantisation
function that only diffusers' or transformers' loader gives it, and ``lora.Linear`` would add the update to an
NF4Tensor's packed data. So an export writes the LoRA alone (``core/sampling_export.py``), to be put on the
pretrained base: a merged copy would be a dequantised base that was never the model trained.

The weights are quantised in place after the components are loaded (so loading peaks at the unquantised size, as
without quantisation), for a folder and for components built from configs alike. For int8 and fp8 this gives the
very tensors diffusers' own loader gives (``from_pretrained(..., quantization_config=TorchAoConfig(config))`` with
``torchao_config(mode)``: tested layer for layer), the path that would avoid that load peak.

Devices: on this machine's CPU (torch 2.13, torchao 0.18.0) all three run forward and backward at ``32-true`` and
``bf16-mixed``; at ``bf16-true`` / ``16-true`` (the whole module cast) fp8 does not (torchao dequantises to the
weight's original float32 and the matmul meets a bf16 input). CUDA is torchao's main target (not run here). At fit
start ``check_fit`` runs one layer of the chosen format as the fit will (device, precision) and refuses, naming
``model.quantize``, the device, the precision and torchao's error, when it fails.

LoRA variants (``model.lora_variant``) over a quantised base, as PEFT 0.21 builds them: LoRA, LoHa and LoKr over all
three formats, DoRA over int8 and fp8, OFT over nf4; the others are refused by name (``UNSUPPORTED_VARIANTS``).

Checkpoints hold only the trainable (LoRA) weights, as without quantisation: a resumed run loads ``pretrained`` and
quantises it again (the same weights give the same quantised weights: the conversion is deterministic).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import warnings
from collections.abc import Iterator

import torch

QUANTIZE_MODES = ("none", "int8", "nf4", "fp8")
#: The torchao release these formats were tested with (constraints.txt pins it).
TESTED_TORCHAO = "0.18.0"
#: QLoRA's NF4 block (64 weights share one scale); the block scales are quantised again in groups of up to 256.
NF4_BLOCK = 64
NF4_SCALER_BLOCK = 256
INSTALL_HINT = "pip install 'lightning-ft[quant]'"


#: (quantize, lora_variant) pairs PEFT 0.21 cannot build or train, with the reason: its OFT layer over a torchao
#: weight demands the requantisation function only diffusers' / transformers' loader provides, and its DoRA layer
#: dequantises the base weight with a call ``NF4Tensor.dequantize`` does not take.
UNSUPPORTED_VARIANTS = {
    ("int8", "oft"): "PEFT's OFT layer over a torchao weight needs the loader's requantisation function",
    ("fp8", "oft"): "PEFT's OFT layer over a torchao weight needs the loader's requantisation function",
    ("nf4", "dora"): "PEFT's DoRA dequantises the base weight in a way torchao's NF4Tensor does not support",
}


def check_quantize_setting(
    quantize: str, trainable: str, method: str = "DiffusionBase", lora_variant: str = "lora"
) -> None:
    """Refuse, naming the key and value, a ``model.quantize`` that is unknown, that is given without a LoRA to train
    (a quantised weight cannot be trained; ``method``: the class, for the message), that PEFT cannot put
    ``model.lora_variant`` on, or whose library is missing. Runs before any component is loaded."""
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"model.quantize={quantize!r}: must be one of {QUANTIZE_MODES}")
    if quantize == "none":
        return
    if trainable != "lora":
        raise ValueError(
            f"model.quantize={quantize!r} quantises the frozen base under a LoRA, but {method} with "
            f"model.trainable={trainable!r} trains the base's own weights, which cannot be quantised: use "
            "model.trainable='lora' (or model.quantize='none')"
        )
    reason = UNSUPPORTED_VARIANTS.get((quantize, lora_variant))
    if reason:
        works = [m for m in QUANTIZE_MODES[1:] if (m, lora_variant) not in UNSUPPORTED_VARIANTS]
        raise ValueError(
            f"model.quantize={quantize!r} with model.lora_variant={lora_variant!r}: {reason}. With this variant use "
            f"model.quantize in {works}, or another model.lora_variant"
        )
    if importlib.util.find_spec("torchao") is None:
        raise ImportError(
            f"model.quantize={quantize!r} needs torchao, which is not installed: {INSTALL_HINT} "
            f"(tested with torchao=={TESTED_TORCHAO})"
        )


def is_quantized_weight(weight: torch.Tensor) -> bool:
    """True for a torchao quantised tensor (int8, fp8: ``TorchAOBaseTensor``; nf4: ``NF4Tensor``)."""
    try:  # an installed module is a dictionary look-up; without torchao nothing is quantised
        from torchao.quantization import NF4Tensor
        from torchao.utils import TorchAOBaseTensor
    except ImportError:
        return False

    return isinstance(weight, (TorchAOBaseTensor, NF4Tensor))


def _linear_weights(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Linear]]:
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear):
            yield name, layer


def quantized_linears(module: torch.nn.Module) -> list[str]:
    """Names of the linear layers of ``module`` whose weight is quantised."""
    return [name for name, layer in _linear_weights(module) if is_quantized_weight(layer.weight)]


def _nf4_scaler_block(n_blocks: int) -> int:
    """The largest group of block scales (a power of two up to 256, torchao's default) that divides ``n_blocks``:
    torchao's default of 256 alone would refuse most diffusion layers (a 320x320 projection has 1,600 blocks)."""
    size = NF4_SCALER_BLOCK
    while n_blocks % size:
        size //= 2
    return size


def _to_nf4(layer: torch.nn.Linear) -> bool:
    from torchao.quantization import to_nf4

    weight = layer.weight.detach()
    if weight.numel() % NF4_BLOCK:
        return False  # no whole NF4 block: the layer stays as loaded (counted as skipped)
    scaler_block = _nf4_scaler_block(weight.numel() // NF4_BLOCK)
    layer.weight = torch.nn.Parameter(to_nf4(weight.contiguous(), NF4_BLOCK, scaler_block), requires_grad=False)
    return True


def torchao_config(mode: str):
    """torchao's ``quantize_`` config of ``int8`` / ``fp8`` (also what diffusers' ``TorchAoConfig`` takes)."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    # set_inductor_config=False: torchao's default rewrites torch._inductor's global settings for its kernels,
    # which would change every torch.compile of the process (model.compile), quantised or not.
    if mode == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    return Float8WeightOnlyConfig(set_inductor_config=False)


def quantize_linears(module: torch.nn.Module, mode: str) -> tuple[int, int]:
    """Quantise, in place, the weight of every ``nn.Linear`` of ``module`` not already quantised; returns
    (quantised, skipped: nf4 layers with no whole block). ``mode``: ``int8`` | ``fp8`` | ``nf4``."""
    if mode not in QUANTIZE_MODES[1:]:
        raise ValueError(f"model.quantize={mode!r}: must be one of {QUANTIZE_MODES[1:]} to quantise")
    todo = [(name, layer) for name, layer in _linear_weights(module) if not is_quantized_weight(layer.weight)]
    if mode == "nf4":
        done = sum(_to_nf4(layer) for _, layer in todo)
        return done, len(todo) - done
    from torchao.quantization import quantize_

    wanted = {id(layer) for _, layer in todo}
    quantize_(module, torchao_config(mode), filter_fn=lambda layer, _name: id(layer) in wanted)
    return len(todo), 0


def quantize_frozen_parts(
    mode: str,
    denoiser: torch.nn.Module,
    teacher: torch.nn.Module | None = None,
    encoders: dict[str, torch.nn.Module] | None = None,
) -> dict[str, dict[str, int]]:
    """Quantise the frozen base: the denoiser (before its LoRA is inserted), a method's frozen teacher and the
    frozen text encoders (by component key). Returns ``{part: {"quantized": n, "skipped": m}}``. An error of the
    library is raised naming ``model.quantize`` and the part.

    The teacher must be a copy made before quantising, and quantised itself: torchao 0.18's ``NF4Tensor`` cannot be
    deep-copied (its ``clone`` requantises with the default block sizes, which most layers here do not fit)."""
    parts = {"denoiser": denoiser, "frozen_denoiser": teacher, **(encoders or {})}
    summary = {}
    for key, part in parts.items():
        if part is None:
            continue
        try:
            done, skipped = quantize_linears(part, mode)
        except Exception as error:  # the library's own message, with the setting and the part it failed on
            raise RuntimeError(f"model.quantize={mode!r}: torchao failed on the {key}: {error}") from error
        summary[key] = {"quantized": done, "skipped": skipped}
    if not summary.get("denoiser", {}).get("quantized"):
        raise ValueError(f"model.quantize={mode!r}: the denoiser has no linear layer that torchao can quantise")
    return summary


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes held by ``module``'s parameters and buffers, a quantised tensor counted by the tensors it stores
    (packed data and scales, through ``__tensor_flatten__``, as ``torchao.utils.get_model_size_in_bytes``, which
    skips the root module's own parameters). Shared tensors are counted once."""

    def size(tensor: torch.Tensor) -> int:
        if hasattr(tensor, "__tensor_flatten__"):
            return sum(size(getattr(tensor, attr)) for attr in tensor.__tensor_flatten__()[0])
        return tensor.numel() * tensor.element_size()

    seen, total = set(), 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += size(tensor)
    return total


#: Lightning precisions -> (dtype the module is cast to, autocast dtype or None).
PRECISION_DTYPES = {
    "32-true": (torch.float32, None), "32": (torch.float32, None),
    "bf16-true": (torch.bfloat16, None), "16-true": (torch.float16, None),
    "bf16-mixed": (torch.float32, torch.bfloat16), "16-mixed": (torch.float32, torch.float16),
}  # fmt: skip


@functools.cache
def _probe(mode: str, device: str, precision: str) -> str | None:
    """Run one linear layer quantised as the base is (from float32 weights), then cast and called as
    ``precision`` casts and calls the module, forward and backward on ``device``: None when it works, else the
    error."""
    dtype, autocast = PRECISION_DTYPES.get(precision, (torch.float32, None))
    try:
        # Its own generator: the probe must not move the global random stream a seeded run draws from.
        generator = torch.Generator().manual_seed(0)
        layer = torch.nn.Linear(4 * NF4_BLOCK, 4 * NF4_BLOCK)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator))
        quantize_linears(layer, mode)
        layer = layer.to(device=device, dtype=dtype)
        x = torch.randn(2, 4 * NF4_BLOCK, generator=generator).to(device, dtype).requires_grad_(True)
        kind = torch.device(device).type
        with torch.autocast(kind, dtype=autocast) if autocast else contextlib.nullcontext():
            out = layer(x)
        out.float().sum().backward()
        if not (torch.isfinite(out).all() and torch.isfinite(x.grad).all()):
            return "non-finite output"
        return None
    except Exception as error:  # whatever the device or precision lacks (a dtype, a kernel), reported by the caller
        return f"{type(error).__name__}: {error}"


def check_fit(mode: str, device: torch.device | str, precision: str = "32-true") -> None:
    """At fit start (device and precision known): refuse, naming ``model.quantize``, the device and
    ``trainer.precision``, a format that cannot run there: one layer of it is run as the fit will run the base."""
    if mode == "none":
        return
    error = _probe(mode, str(device), str(precision))
    if error is not None:
        works = [m for m in QUANTIZE_MODES[1:] if m != mode and _probe(m, str(device), str(precision)) is None]
        raise RuntimeError(
            f"model.quantize={mode!r} cannot run on {device} at trainer.precision={precision!r}: a {mode} linear "
            f"layer failed there ({error}). Formats that run there: {works or 'none'}; or another trainer.precision"
        )


@contextlib.contextmanager
def lora_over_quantized(mode: str):
    """Within this block PEFT's warning that a ``TorchaoLoraLinear`` made outside diffusers' / transformers' loader
    cannot merge is silenced: this code never merges into a quantised base (the export writes the LoRA alone)."""
    if mode == "none":
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"TorchaoLoraLinear was instantiated without")
        yield


def export_record(mode: str, pretrained: str | None, summary: dict | None) -> dict:
    """What an export of a quantised model records in its ``lightning_ft.json``: the LoRA alone, on which base."""
    import torchao

    return {
        "lora_only": True,
        "quantized_base": {
            "quantize": mode,
            "library": f"torchao {torchao.__version__}",
            "base": pretrained,
            "quantized_linears": {part: counts["quantized"] for part, counts in (summary or {}).items()},
            "note": (
                "LoRA weights trained over a quantised base; nothing is merged and the base is not in this folder. "
                "Load them on the pretrained base (pipe.load_lora_weights), quantised the same way to sample the "
                "model exactly as trained (lightning_ft.core.quantize.quantize_linears)"
            ),
        },
    }
