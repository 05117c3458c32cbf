"""Swappable feature extractors for the scores: DINO (v1, v2), CLIP, Inception, or any factory a model declares.

Every backbone is wrapped as a ``FeatureExtractor``: float images in [0, 1], (N, 3, H, W) in, (N, D) features out,
frozen, with a ``num_features`` attribute so that torchmetrics' FID/KID accept it as a custom ``feature`` module.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ft.metrics.images import as_float_images

BACKBONES = ("dino", "dinov2", "clip", "inception")
# The normalisation CLIP was trained with (OpenAI CLIP), used when a checkpoint has no preprocessor_config.json.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class FeatureExtractor(nn.Module):
    """A frozen image -> feature module: float images in [0, 1] (or uint8), (N, 3, H, W) -> (N, D) float32.

    Args:
        module: maps prepared float images (N, 3, H, W) in [0, 1] to (N, D) features.
        num_features: D.
        name: backbone name, logged beside scores so that numbers from different backbones are never compared.

    It stays in eval mode whatever ``train()`` is called with: as a submodule of a torchmetrics Metric inside a
    LightningModule it would otherwise be switched to training mode with its parent.
    """

    def __init__(self, module: nn.Module, num_features: int, name: str):
        super().__init__()
        self.module = module.eval().requires_grad_(False)
        self.num_features = int(num_features)
        self.name = name

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)

    @property
    def device(self) -> torch.device:
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def forward(self, images: Tensor) -> Tensor:
        x = as_float_images(images).to(self.device)
        with torch.no_grad():
            return self.module(x).float().flatten(1)

    def extract(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Features of ``images`` computed ``batch_size`` at a time, (N, D) float32 on the backbone's device."""
        if len(images) == 0:
            return torch.zeros(0, self.num_features, device=self.device)
        return torch.cat([self(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


class _InceptionUint8(nn.Module):
    """torchmetrics' torch-fidelity Inception takes uint8 in [0, 255] and resizes to 299 itself."""

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.inception = inception

    def forward(self, x: Tensor) -> Tensor:
        return self.inception((x * 255).round().to(torch.uint8))


class CLIPPreprocess(nn.Module):
    """Images in [0, 1] (N, 3, H, W) -> CLIP pixel values: antialiased bicubic resize to ``image_size``, then
    normalise by ``mean`` / ``std`` (shared by the CLIP metric backbone and ANL's CLIP condition encoder)."""

    def __init__(self, image_size: int, mean: tuple = CLIP_MEAN, std: tuple = CLIP_STD):
        super().__init__()
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True)
        return (x - self.mean) / self.std


class _CLIPImageEmbeds(nn.Module):
    """CLIP-preprocess, return the projected image embeddings (N, projection_dim)."""

    def __init__(self, model: nn.Module, preprocess: CLIPPreprocess):
        super().__init__()
        self.model, self.preprocess = model, preprocess

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(pixel_values=self.preprocess(x))
        # transformers 5 returns output objects, not tensors: take the projected embeddings when the model has a
        # projection, else the pooled output.
        embeds = getattr(out, "image_embeds", None)
        return embeds if embeds is not None else out.pooler_output


class _CLSToken(nn.Module):
    """Preprocess, return the CLS token of the last hidden state: DINO's image embedding (v1 and v2)."""

    def __init__(self, model: nn.Module, preprocess: nn.Module):
        super().__init__()
        self.model, self.preprocess = model, preprocess

    def forward(self, x: Tensor) -> Tensor:
        return self.model(pixel_values=self.preprocess(x)).last_hidden_state[:, 0]


# ImageNet normalisation, what DINO v1 and v2 were trained with (used when a folder has no preprocessor_config.json).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Hub ids used when a backbone is named without a path: the checkpoints the papers score with. Offline, pass a local
# folder (``save_pretrained`` output) instead.
DEFAULT_CHECKPOINTS = {
    "dino": "facebook/dino-vits16",  # BNN / DreamBooth papers: DINO ViT-S/16
    "dinov2": "facebook/dinov2-small",
    "clip": "openai/clip-vit-large-patch14",  # CLIP-I / CLIP-T of the BNN evaluation
}


def _normalisation(folder: str, mean: tuple, std: tuple) -> tuple[tuple, tuple]:
    config = Path(folder) / "preprocessor_config.json"
    if not config.exists():
        return mean, std
    pre = json.loads(config.read_text())
    return tuple(pre.get("image_mean", mean)), tuple(pre.get("image_std", std))


def _crop_size(folder: str, default: int) -> int:
    """The side the checkpoint's image processor crops to (``crop_size``), else ``default``."""
    config = Path(folder) / "preprocessor_config.json"
    if not config.exists():
        return default
    crop = json.loads(config.read_text()).get("crop_size", default)
    return int(crop.get("height", default) if isinstance(crop, dict) else crop)


def clip_normalisation(folder: str | Path) -> tuple[tuple, tuple]:
    """(mean, std) of a CLIP checkpoint: its ``preprocessor_config.json`` when present, else OpenAI CLIP's."""
    return _normalisation(str(folder), CLIP_MEAN, CLIP_STD)


def load_pretrained(cls, path: str, what: str, unused: tuple[str, ...] = ("pooler.",), **kwargs):
    """``cls.from_pretrained(path)`` with an error that names the backbone and the path when it cannot load
    (an offline machine given a hub id, a folder of another model type).

    For a model class, weights the checkpoint lacks are an error too: transformers would otherwise initialise them
    at random with only a log line (e.g. a ViT folder loaded as DINOv2 or CLIP), and every score would silently
    come from a random network. Missing weights whose names start with one of ``unused`` are allowed (default: the
    pooler, which DINO v1 checkpoints lack and no backbone here uses). ``kwargs`` go to ``from_pretrained``."""
    from transformers import PreTrainedModel

    is_model = isinstance(cls, type) and issubclass(cls, PreTrainedModel)
    try:
        if not is_model:
            return cls.from_pretrained(path, **kwargs)
        model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        # RuntimeError: transformers 5 raises it for weights of another shape (a checkpoint of another size).
        raise OSError(
            f"could not load the {what} backbone from {path!r} ({type(error).__name__}: {str(error)[:300]}); "
            "give a local folder written by save_pretrained as the backbone path, or a hub id where the hub is "
            "reachable"
        ) from error
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(unused))
    if missing:
        raise OSError(
            f"could not load the {what} backbone from {path!r}: the checkpoint has no weights for {len(missing)} "
            f"parameters of {cls.__name__} (e.g. {missing[:3]}); is it a checkpoint of another model type?"
        )
    return model


def _dino(path: str | None, v2: bool) -> FeatureExtractor:
    from transformers import Dinov2Model, ViTModel

    name = "dinov2" if v2 else "dino"
    path = path or DEFAULT_CHECKPOINTS[name]
    model = load_pretrained(Dinov2Model if v2 else ViTModel, path, name)
    # v1 checkpoints are plain ViTs whose pooler is untrained: the CLS token of the last layer is DINO's embedding.
    # DINOv2's config says 518 (its position table), but its processor feeds 224 crops: score at what it was fed.
    size = _crop_size(path, 224 if v2 else model.config.image_size)
    preprocess = CLIPPreprocess(size, *_normalisation(path, IMAGENET_MEAN, IMAGENET_STD))
    return FeatureExtractor(_CLSToken(model, preprocess), model.config.hidden_size, name)


def _inception(path: str | None) -> FeatureExtractor:
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError(
            "the 'inception' backbone needs torch-fidelity (pip install torch-fidelity) and downloads its Inception "
            "weights on first use, or reads them from the backbone path"
        )
    from torchmetrics.image.fid import NoTrainInceptionV3

    inception = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=path
    )
    return FeatureExtractor(_InceptionUint8(inception), 2048, "inception")


def _clip(path: str | None) -> FeatureExtractor:
    from transformers import AutoConfig, CLIPVisionModelWithProjection

    path = path or DEFAULT_CHECKPOINTS["clip"]
    config = load_pretrained(AutoConfig, path, "clip")
    kwargs = {}
    if getattr(config, "model_type", None) == "clip":
        # A full CLIP model: its visual projection has the whole model's projection_dim, which the vision sub-config
        # need not carry (transformers saves the sub-config's default, 512): without this the projection would not
        # load.
        vision = config.vision_config
        vision.projection_dim = config.projection_dim
        kwargs["config"] = vision
    model = load_pretrained(CLIPVisionModelWithProjection, path, "clip", **kwargs)
    config = model.config
    preprocess = CLIPPreprocess(config.image_size, *clip_normalisation(path))
    dim = getattr(config, "projection_dim", None) or config.hidden_size
    return FeatureExtractor(_CLIPImageEmbeds(model, preprocess), dim, "clip")


def import_factory(spec: str):
    """The callable named ``"package.module:function"``. This is how a model folder declares a backbone of its own
    (the embedded world does) without the framework importing it."""
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"backbone {spec!r}: cannot import {attr!r} from {module_name!r} ({error})") from error


def _factory(spec: str, path: str | None) -> FeatureExtractor:
    """``function(path)`` of ``import_factory(spec)``, which must return a ``FeatureExtractor``."""
    backbone = import_factory(spec)(path)
    if not isinstance(backbone, FeatureExtractor):
        raise TypeError(f"backbone factory {spec!r} returned {type(backbone).__name__}, not a FeatureExtractor")
    return backbone


def make_backbone(name: str, path: str | Path | None = None, device: str | torch.device = "cpu") -> FeatureExtractor:
    """A frozen feature extractor by name.

    Args:
        name: ``"dino"`` (DINO v1 ViT, CLS token), ``"dinov2"`` (DINOv2, CLS token), ``"clip"`` (CLIP image
            embeddings), ``"inception"`` (torchmetrics' FID Inception; needs torch-fidelity) or
            ``"package.module:function"`` (a factory taking ``path`` and returning a ``FeatureExtractor``).
        path: a local folder written by ``save_pretrained`` or a hub id (default: ``DEFAULT_CHECKPOINTS[name]``,
            the paper's checkpoint); for ``inception`` an optional local weights file; passed as is to a factory.
        device: where the backbone runs (default ``"cpu"``).
    """
    path = None if path is None else str(path)
    if ":" in name:
        return _factory(name, path).to(device)
    builders = {
        "dino": lambda p: _dino(p, v2=False),
        "dinov2": lambda p: _dino(p, v2=True),
        "clip": _clip,
        "inception": _inception,
    }
    if name not in builders:
        raise ValueError(f"unknown backbone {name!r}; expected one of {BACKBONES} or 'package.module:function'")
    return builders[name](path).to(device)


# ------------------------------------------------------------------------------------ which backbone for a model
ROLES = ("identity", "fid", "prompt", "condition")
# What a model that declares nothing is scored with: the backbones of the papers (see DEFAULT_CHECKPOINTS).
ROLE_DEFAULTS = {"identity": "dino", "fid": "inception", "prompt": "clip", "condition": "clip"}
DECLARATION = "lightning_ft.json"


def declared_backbones(folder: str | Path | None) -> dict[str, dict]:
    """The backbones a model folder declares in ``lightning_ft.json`` (``{"backbones": {role: {"name": ...,
    "path": ...}}}``), by role; empty when the folder (or the file) does not exist, e.g. for a hub id."""
    if not folder:
        return {}
    file = Path(folder) / DECLARATION
    if not file.is_file():
        return {}
    try:
        content = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error})") from error
    if not isinstance(content, dict):
        raise ValueError(f"{file}: expected an object with a 'backbones' key, got {type(content).__name__}")
    return check_declaration(content.get("backbones", {}), str(file))


def check_declaration(backbones: dict, where: str) -> dict:
    """``backbones`` ({role: {"name": ..., "path": ...}}) checked: known roles, each with a name; returned as is."""
    if not isinstance(backbones, dict):
        raise ValueError(f"{where}: backbones must be a mapping of role to {{name, path}}, got {backbones!r}")
    unknown = set(backbones) - set(ROLES)
    if unknown:
        raise ValueError(f"{where}: unknown backbone roles {sorted(unknown)}; expected some of {ROLES}")
    for role, entry in backbones.items():
        if not isinstance(entry, dict) or not entry.get("name"):
            raise ValueError(f"{where}: backbone role {role!r} needs a 'name', got {entry!r}")
    return backbones


def model_backbones(pl_module) -> dict:
    """The backbones a module declares, by role: its ``backbones`` argument when given (a model built from configs
    can declare its own), else what its pretrained folder declares in ``lightning_ft.json``."""
    hparams = getattr(pl_module, "hparams", None) or {}
    get = hparams.get if hasattr(hparams, "get") else lambda key: None
    if get("backbones"):
        return check_declaration(dict(get("backbones")), "model.backbones")
    return declared_backbones(get("pretrained"))


def write_declaration(backbones: dict, destination: str | Path, extra: dict | None = None) -> None:
    """Write ``lightning_ft.json`` declaring ``backbones`` (and what the model family records in ``extra``, e.g. a
    DiT export's real class count) into ``destination``; nothing when both are empty. An export is scored like the
    model it came from."""
    content = {"backbones": backbones} if backbones else {}
    content.update(extra or {})
    if content:
        (Path(destination) / DECLARATION).write_text(json.dumps(content, indent=2) + "\n")


def backbone_spec(role: str, name: str = "auto", path: str | None = None, declared: dict | None = None) -> tuple:
    """(name, path) of the backbone for ``role`` (``identity``: subject fidelity; ``fid``; ``prompt``: CLIP-T;
    ``condition``: image conditions). ``name="auto"`` takes what the model declares (``declared``, e.g.
    ``model_backbones(module)`` or ``declared_backbones(folder)``) and, when it declares nothing for the role, the
    role's paper default (``ROLE_DEFAULTS``); a given name is used as is. A model is never scored with another
    model's backbone by accident: nothing falls back to the embedded network."""
    if role not in ROLES:
        raise ValueError(f"unknown backbone role {role!r}; expected one of {ROLES}")
    if name != "auto":
        return name, path
    entry = (declared or {}).get(role)
    if entry:
        return entry["name"], path or entry.get("path")
    return ROLE_DEFAULTS[role], path


def resolve_backbone(
    role: str, name: str = "auto", path: str | None = None, declared: dict | None = None, device="cpu"
) -> FeatureExtractor:
    """``make_backbone(*backbone_spec(...))``: the frozen backbone for ``role`` of a model that declares
    ``declared``."""
    return make_backbone(*backbone_spec(role, name, path, declared), device=device)


def as_backbone(backbone: nn.Module | str) -> FeatureExtractor:
    """``backbone`` as a ``FeatureExtractor``: a name -> ``make_backbone(name)``, a ``FeatureExtractor`` as is,
    a bare module with ``num_features`` -> wrapped (which freezes that module in place)."""
    if isinstance(backbone, str):
        return make_backbone(backbone)
    if isinstance(backbone, FeatureExtractor):
        return backbone
    if not hasattr(backbone, "num_features"):
        raise TypeError("a backbone module needs a num_features attribute (its feature size D)")
    return FeatureExtractor(backbone, backbone.num_features, type(backbone).__name__)
