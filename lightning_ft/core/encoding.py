"""Encoding for ``DiffusionBase``: images to the denoiser's space, inputs to ``Condition``s, and the denoiser call.

The family adapter (``self.family``) says what a condition is; this mixin adds what every family shares: the VAE
posterior and its cache, the text-feature cache of frozen text encoders, condition dropout, and the null condition,
which is built here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_info

from lightning_ft.core.conditions import Condition
from lightning_ft.core.encoding_cache import EncodingCache, tensor_key


def image_geometry(
    n: int, size: tuple[int, int], original: torch.Tensor | None = None, crop: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """``original_size``, ``crop_top_left`` and ``target_size`` (n, 2) of ``n`` images of ``size`` (h, w); missing
    values default to the pipelines' own: original = target, crop (0, 0)."""
    target = torch.tensor([list(size)] * n, dtype=torch.long)
    original = target.clone() if original is None else torch.as_tensor(original).long().cpu().view(n, 2)
    crop = torch.zeros(n, 2, dtype=torch.long) if crop is None else torch.as_tensor(crop).long().cpu().view(n, 2)
    return {"original_size": original, "crop_top_left": crop, "target_size": target}


def parameter_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of ``model``'s first parameter. Not diffusers' ``ModelMixin.dtype``, which walks every submodule
    (about 1.7 ms per call on the embedded UNet: twice a step, it was most of the framework's overhead)."""
    return next(model.parameters()).dtype


#: ``cache_latents=None`` (auto) turns the cache on when the data gives at most this many distinct views per image:
#: a view is then seen again and again over a fine-tuning run, and the cache stays a few entries per image.
LATENT_CACHE_VIEWS_PER_IMAGE = 8


def decide_latent_cache(module, datamodule) -> bool:
    """``cache_latents=None``: turn ``module``'s latent cache on when ``datamodule``'s dataset says how many distinct
    image views it makes (``distinct_views()``, as ``LimitedDataModule``'s does) and they are few per image; print
    the decision (rank 0). Another data module leaves it off: its augmentation is unknown."""
    dataset = getattr(datamodule, "dataset", None)
    count = getattr(dataset, "distinct_views", None)
    if count is None:
        reason, on = f"{type(datamodule).__name__} does not report its image views", False
    else:
        views = count()
        images = len(getattr(dataset, "images", [])) + len(getattr(dataset, "class_images", []))
        on = 0 < views <= LATENT_CACHE_VIEWS_PER_IMAGE * max(images, 1)
        reason = f"{views} distinct views of {images} images (crops x flips)"
    if on:
        module.latent_cache = EncodingCache()
    rank_zero_info(
        f"lightning-ft: model.cache_latents=auto: {'on' if on else 'off'} ({reason}; "
        f"on at <= {LATENT_CACHE_VIEWS_PER_IMAGE} per image). Set it true or false to choose."
    )
    return on


class EncodingMixin:
    """Needs ``family``, ``parts``, ``vae``, ``hparams``, ``latent_cache``, ``text_cache`` and ``device``."""

    # ------------------------------------------------------------------------------------------------ images
    def encode_images(
        self, pixel_values: torch.Tensor, generator: torch.Generator | None = None, keys: list | None = None,
        sample: bool = True,
    ) -> torch.Tensor:
        """Images in [-1, 1] to the denoiser's space: VAE latents scaled by ``scaling_factor``, or the pixels.

        With ``cache_latents`` the VAE posterior (mean, std) of each distinct image is computed once; a fresh
        latent is still sampled from it every time, exactly as without the cache. A (CPU) ``generator`` draws
        that latent instead of the global RNG. ``keys``: the images' cache keys, as ``on_before_batch_transfer``
        puts them in a batch (``<field>_keys``, hashed on the CPU before the batch moves to the accelerator);
        without them the images are hashed here, which on an accelerator copies them back to the host. With
        ``sample=False`` the latent is the posterior's mean (its mode; nothing is drawn), as pipelines encode the
        images they condition on."""
        if self.vae is None:
            return pixel_values

        def posterior(indices: list[int]) -> torch.Tensor:
            with torch.no_grad():
                return self.family.vae_posterior(self.vae, pixel_values[indices].to(parameter_dtype(self.vae)))

        if self.latent_cache is not None:
            if keys is None or len(keys) != len(pixel_values):
                keys = [tensor_key(image) for image in pixel_values]
            params = self.latent_cache.lookup(keys, posterior)
        else:
            params = posterior(list(range(len(pixel_values))))
        mean, std = params[:, 0], params[:, 1]
        if not sample:
            return self.family.model_latents(self.vae, mean).to(pixel_values.dtype).contiguous()
        # randn(shape), not randn_like: the latter follows the (view's) strides, so the same seed would draw
        # different latents with and without the cache.
        if generator is None:
            eps = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        else:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        latents = self.family.model_latents(self.vae, mean + std * eps)
        # Contiguous: some VAEs return channels-last latents, and diffusers' resnets then take other conv kernels in
        # train and eval mode, so a student and its frozen teacher would differ by ~1e-6 with equal weights.
        return latents.to(pixel_values.dtype).contiguous()

    def image_keys(self, batch: dict, *fields: str) -> list | None:
        """The cache keys of the images of ``fields`` of ``batch`` (default ``pixel_values``), concatenated, or None
        when a field has none (then ``encode_images`` hashes the images itself)."""
        keys = []
        for field in fields or ("pixel_values",):
            found = batch.get(f"{field}_keys")
            if found is None:
                return None
            keys += list(found)
        return keys

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """With a latent cache, hash each image field of a batch (``*pixel_values``) on the CPU, before Lightning moves
        it to the accelerator: the keys go with the batch as ``<field>_keys`` (lists stay on the host)."""
        if self.latent_cache is not None and isinstance(batch, dict):
            for field in [k for k in batch if k.endswith("pixel_values")]:
                value = batch[field]
                if isinstance(value, torch.Tensor) and value.device.type == "cpu" and f"{field}_keys" not in batch:
                    batch[f"{field}_keys"] = [tensor_key(image) for image in value]
        return batch

    # -------------------------------------------------------------------------------------------------- text
    def text_features(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """The family's per-sample text features of ``prompts`` (tokenised as its pipeline does). Frozen encoders'
        features are cached per distinct token sequence (``cache_text_embeddings``); training ones carry a graph."""
        parts = self.parts
        ids = [t.to(self.device) for t in self.family.tokenize(parts, prompts)]
        if self.hparams.train_text_encoder:
            context = torch.enable_grad() if self.training else torch.no_grad()
            with context:
                return self.family.encode_ids(parts, ids)

        def encode(indices: list[int]) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return self.family.encode_ids(parts, [t[indices] for t in ids])

        if self.text_cache is None:
            return encode(list(range(len(prompts))))
        keys = [tuple(tuple(t[i].tolist()) for t in ids) for i in range(len(prompts))]
        return self.text_cache.lookup(keys, encode)

    def encode_prompts(self, prompts: Sequence[str]) -> Condition:
        """The condition of ``prompts`` for a text family, at the native resolution's geometry."""
        return self.encode_inputs(list(prompts))

    # ---------------------------------------------------------------------------------------------- conditions
    def encode_inputs(self, inputs, n: int | None = None, geometry: dict | None = None) -> Condition:
        """The ``Condition`` of raw inputs (prompts, labels, or None with ``n``); ``geometry`` defaults to images
        of the native resolution (see ``image_geometry``)."""
        n = len(inputs) if inputs is not None else n
        if geometry is None:
            side = self.native_resolution()
            geometry = image_geometry(n, (side, side))
        condition = self.family.encode(self, inputs, n, geometry)
        dtype = parameter_dtype(self.denoiser)
        if any(v.is_floating_point() and v.dtype != dtype for v in condition.fields.values()):
            condition = condition.to(dtype=dtype)  # frozen encoders held in another dtype (frozen_dtype)
        return condition

    def null_condition(self, n: int, size: tuple[int, int] | None = None) -> Condition:
        """The unconditional condition of ``n`` samples (empty prompt, null class, nothing), for images of ``size``
        (default native): the one place it is built."""
        side = self.native_resolution()
        geometry = image_geometry(n, size or (side, side))
        return self.encode_inputs(self.family.null_inputs(n), n, geometry)

    def batch_geometry(self, batch: dict, prefix: str = "", pixels_key: str = "pixel_values") -> dict:
        """The geometry of a batch's images, from the ``original_size`` / ``crop_top_left`` the data module records
        (with ``prefix``, e.g. ``class_``), else the defaults."""
        pixels = batch[pixels_key]
        return image_geometry(
            len(pixels),
            tuple(pixels.shape[-2:]),
            batch.get(f"{prefix}original_size"),
            batch.get(f"{prefix}crop_top_left"),
        )

    def encode_conditions(self, batch: dict, prompts_key: str = "prompts", labels_key: str = "class_labels"):
        """The condition of a batch, with condition dropout: the rows the data flags (``batch["drop_condition"]``,
        from ``data.caption_dropout``; honoured whenever present, in training or not) and, in training, the rows of
        a ``condition_dropout`` draw take the family's null input. The draw is made as without flags (same calls,
        same order), so flags never shift the global RNG stream."""
        inputs = self.family.batch_inputs(batch, prompts_key, labels_key)
        n = len(batch["pixel_values"]) if inputs is None else len(inputs)
        flags = self.data_drop_flags(batch, n)
        p = self.hparams.condition_dropout if self.training else 0.0
        if (p > 0 or flags is not None) and inputs is not None:
            drop = None
            if p > 0:
                if isinstance(inputs, list):
                    drop = torch.rand(n) < p
                else:
                    inputs = inputs.to(self.device)
                    drop = torch.rand(n, device=self.device) < p
            if flags is not None:
                drop = flags if drop is None else drop | flags.to(drop.device)
            inputs = self.family.with_null(inputs, drop)
        geometry = self.batch_geometry(batch) if "pixel_values" in batch else None
        condition = self.with_control(self.encode_inputs(inputs, n, geometry), batch.get("control_values"))
        return self.with_source(condition, inputs, batch.get("source_values"))

    def with_source(self, condition: Condition, inputs, sources: torch.Tensor | None) -> Condition:
        """``condition`` with what an editing model reads of its source images (``sources``: (B, 3, H, W) in [0, 1], a
        batch's ``source_values``; the family's ``encode_sources``); unchanged without them. An editing model without
        them, or source images for another model, fail naming the setting."""
        if sources is None:
            if self.family.needs_source:
                raise ValueError(f"the {self.family.name} family is an editing model: its batches need source images "
                                 "(data.source_dir, or a cond_image field in data.captions_file)")  # fmt: skip
            return condition
        condition = self.family.encode_sources(self, condition, inputs, sources.to(self.device))
        dtype = parameter_dtype(self.denoiser)
        if any(v.is_floating_point() and v.dtype != dtype for v in condition.fields.values()):
            condition = condition.to(dtype=dtype)
        return condition

    def with_control(self, condition: Condition, control: torch.Tensor | None) -> Condition:
        """``condition`` with its control images (``controlnet_cond``: (B, 3, H, W) in [0, 1], a batch's
        ``control_values``) for a model with a ControlNet; unchanged without them. Control images for a model
        without a ControlNet fail, naming the setting."""
        if control is None:
            return condition
        if getattr(self, "controlnet", None) is None:
            raise ValueError("the batch has control images (data.control_dir or a conditioning_image column), but the "
                             "model has no ControlNet: set model.trainable='controlnet'")  # fmt: skip
        return condition.replace(controlnet_cond=control.to(self.device, parameter_dtype(self.denoiser)))

    def data_drop_flags(self, batch: dict, n: int) -> torch.Tensor | None:
        """``batch["drop_condition"]`` as a bool tensor (n,) (None without the key): the samples the data module's
        caption dropout trains with the null condition. A class-conditional model without a null class fails here,
        naming the settings, rather than deep in its family."""
        flags = batch.get("drop_condition")
        if flags is None:
            return None
        flags = torch.as_tensor(flags, dtype=torch.bool).reshape(-1)
        if len(flags) != n:
            raise ValueError(f"batch['drop_condition'] holds {len(flags)} flags for a batch of {n} samples")
        if getattr(self.family, "uses_null_class", False) and getattr(self.family, "null_class", 0) is None:
            raise ValueError(
                "data.caption_dropout > 0 trains samples with the null class, and this class-conditional model has "
                "none: set model.null_class, or data.caption_dropout=0"
            )
        return flags

    # ------------------------------------------------------------------------------------------------ denoiser
    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, condition: Condition, denoiser=None):
        """Run a denoiser (default ``self.denoiser``) and return its prediction with the input's channel count."""
        denoiser = denoiser if denoiser is not None else self.denoiser
        model_t = self.noise_process.model_timesteps(timesteps, noisy)
        dtype = parameter_dtype(denoiser)
        controlnet = getattr(self, "controlnet", None)
        if controlnet is not None and "controlnet_cond" not in condition:
            raise ValueError("this model has a ControlNet: its conditions need control images (controlnet_cond)")
        if dtype != noisy.dtype and not torch.is_autocast_enabled(noisy.device.type):
            # A frozen teacher held in another dtype (frozen_dtype): its output comes back in the input's dtype.
            noisy_in, condition_in = noisy.to(dtype), condition.to(dtype=dtype)
        else:
            noisy_in, condition_in = noisy, condition
        residuals = {}
        if controlnet is not None:  # the ControlNet's residuals go into the denoiser's blocks (its family's call)
            residuals = self.family.control_residuals(controlnet, noisy_in, model_t, condition_in)
        out = self.family.denoise(denoiser, noisy_in, model_t, condition_in, **residuals).to(noisy.dtype)
        # Learned-variance models (DiT, IF) predict 2x channels; the mean part is the first half.
        return out[:, : noisy.shape[1]] if out.shape[1] != noisy.shape[1] else out
