"""Command-line entry: ``python -m lightning_ft.run {fit,validate,test,predict} --config experiment.yaml``.

A thin ``LightningCLI`` (``lightning_ft.cli.FineTuneCLI``, which adds resume checks, input checks and clean-up of
failed runs): the model is any ``LightningModule`` (normally a ``DiffusionBase`` subclass) and the data any
``LightningDataModule``, both given by ``class_path`` + ``init_args``. YAML is parsed in OmegaConf mode, so
``${...}`` interpolation works, and two resolvers are registered:

- ``${asset:NAME}``: absolute path of an embedded model shipped in ``lightning_ft/embedded/assets/NAME``.
- ``${embedded:NAME}``: folder of an embedded few-shot target (written on first use, then reused).

Both belong to the embedded world (``lightning_ft.embedded``) and import it only when a config uses them.
"""

from __future__ import annotations

import os

import lightning as L
from omegaconf import OmegaConf

from lightning_ft.cli import FineTuneCLI


def _embedded_asset(name: str) -> str:
    from lightning_ft.embedded import asset_path

    return str(asset_path(name))


def _embedded_target(name: str) -> str:
    # Imported lazily: writing a target renders images, which the other subcommands never need.
    from lightning_ft.embedded.targets import ensure_target

    return str(ensure_target(name))


def register_resolvers() -> None:
    """Register the project's OmegaConf resolvers (idempotent)."""
    for name, fn in {"asset": _embedded_asset, "embedded": _embedded_target}.items():
        if not OmegaConf.has_resolver(name):
            # omegaconf 2.4 renamed register_new_resolver to register_resolver.
            register = getattr(OmegaConf, "register_resolver", None) or OmegaConf.register_new_resolver
            register(name, fn)


def wandb_has_credentials() -> bool:
    """True when W&B could log online: an API key in the environment or in ~/.netrc (what `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def main(args: list[str] | None = None, run: bool = True) -> FineTuneCLI:
    """Run the CLI on ``args`` (default: sys.argv); with ``run=False`` only parse and instantiate (tests)."""
    register_resolvers()
    # W&B must work with no account: offline unless credentials exist or the user chose a mode.
    if "WANDB_MODE" not in os.environ and not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
    return FineTuneCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        # Atomic checkpoint writes by default (a kill during a save never leaves a checkpoint that loads wrong).
        trainer_defaults={"plugins": [{"class_path": "lightning_ft.core.checkpoint_io.AtomicCheckpointIO"}]},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
