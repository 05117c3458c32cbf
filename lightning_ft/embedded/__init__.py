"""The embedded world: a procedural shapes domain, its pretrained models and its metric network.

Development, CI and a first-time user have no model hub and no GPU, so the default experiments run on a small world
that this package makes and ships: the renderer (``shapes``), the few-shot targets (``targets``), the source-domain
datamodule (``datamodule``), the autoencoder pretraining (``autoencoder``), the feature network and its training
(``feature_net``, ``train_feature_net``), its metric backbones (``backbones``) and the shipped models (``assets/``).

The framework (core, methods, callbacks, metrics) never imports this package: it reaches the embedded metric
network only through the backbone a model folder declares (``lightning_ft.json``), as any model could.
"""

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"


def asset_path(name: str) -> Path:
    """Path of a shipped asset folder; a clear error names the folder when it is missing."""
    path = ASSETS_DIR / name
    if not path.exists():
        available = (
            sorted(p.name for p in ASSETS_DIR.iterdir() if not p.name.startswith("_")) if ASSETS_DIR.exists() else []
        )
        raise FileNotFoundError(f"asset {name!r} not found at {path}; available: {available}")
    return path
