"""``LimitedDataModule``: a handful to a few hundred images, with optional prior-preservation class images."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_ft.data.buckets import (
    MAX_ASPECT,
    BucketBatchSampler,
    build_views,
    describe_buckets,
    parse_buckets,
    resolution_list,
)
from lightning_ft.data.captions import CaptionAugment, caption_rng, caption_setting_warnings, check_caption_settings
from lightning_ft.data.class_images import class_cache_folder, generate_class_images
from lightning_ft.data.controls import load_validation_controls, read_controls, read_sources
from lightning_ft.data.folder import (
    caption_sources,
    describe_folder,
    distinct_views,
    list_images,
    load_images,
    read_captions,
    read_labels,
    skipped_files,
    to_tensor_with_geometry,
)
from lightning_ft.data.masks import mask_warnings, read_masks
from lightning_ft.data.odd_inputs import (
    caption_warnings,
    duplicate_warnings,
    image_warnings,
    token_warnings,
    unsupported_warnings,
)
from lightning_ft.data.samplers import EpochSeededRandomSampler

#: The model settings that shape generated class images (besides the model itself), part of their cache key.
SAMPLER_HPARAMS = ("sample_scheduler", "sample_scheduler_kwargs", "sample_steps", "guidance_scale")


class LimitedDataset(Dataset):
    """Item ``i`` pairs view ``i mod V`` of the instance images with class image ``i mod M`` (DreamBooth's pairing).

    A view is an instance image at one size: ``views`` lists ``(image index, size)``, a size being a side (a square
    crop) or an aspect bucket's ``(w, h)`` (default: every image once at ``resolution``). The class image of an item
    is cropped to its instance view's size, so both halves of a batch from one bucket share it.

    Augmentation (random crop, flip) is drawn from a generator seeded by ``(seed, i)``, caption augmentation
    (``captions``) from one of its own (``captions.caption_rng``): the same index always gives the same item, so
    runs are reproducible whatever the worker count, and a resumed run sees the items the unbroken one would have.

    Items hold ``pixel_values`` (CHW in [-1, 1]), ``prompts``, ``class_labels`` (if labelled) and SDXL's
    micro-conditioning: ``original_size`` (``[h, w]`` of the image as read, before resizing) and ``crop_top_left``
    (``[top, left]`` of the crop in the resized image, diffusers' flip convention: see ``to_tensor_with_geometry``),
    long tensors of shape (2,) that the default collate stacks to (B, 2); the target size is the pixels' own.
    With ``masks`` (one ``L`` image per instance image), ``mask`` (1, H, W) in [0, 1], cropped and flipped with the
    pixels. With ``controls`` (a ControlNet's control image per instance image), ``control_values`` (3, H, W) in
    [0, 1], cropped and flipped with the pixels; with ``sources`` (an editing model's source image per instance
    image), ``source_values`` (3, H, W) in [0, 1], cropped and flipped with the pixels. With caption dropout,
    ``drop_condition`` (a bool: train this item with the null condition).
    With class images, also ``class_pixel_values``, ``class_prompts``, ``class_original_size`` and
    ``class_crop_top_left``, and ``class_class_labels`` (their class) for a class-conditional model; prior images
    are never masked or dropped (``class_mask`` is ones, ``class_drop_condition`` False)."""

    def __init__(
        self,
        images,
        prompts,
        class_images=None,
        class_prompts=None,
        resolution=32,
        center_crop=True,
        random_flip=False,
        repeats=1,
        seed=0,
        labels=None,
        class_image_labels=None,
        views=None,
        masks=None,
        captions=None,
        controls=None,
        sources=None,
    ):
        if controls is not None and sources is not None:
            raise ValueError("LimitedDataset: control images and source images are two models' data: give one")
        self.images, self.prompts, self.labels = images, prompts, labels
        self.class_image_labels = class_image_labels
        self.class_images, self.class_prompts = class_images or [], class_prompts or []
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.views = views if views is not None else [(i, resolution) for i in range(len(images))]
        self.masks, self.captions, self.controls, self.sources = masks, captions, controls, sources
        self.length = max(len(self.views) * repeats, len(self.class_images))
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def size_of(self, index: int):
        """The size of item ``index``'s views (a side, or a bucket's (w, h)): what its batch shares."""
        return self.views[index % len(self.views)][1]

    def distinct_views(self) -> int:
        """How many different image tensors this dataset can produce (every crop and flip of every instance view, and
        of every class image at every view size): the most entries a content-keyed latent cache can reach."""
        count = sum(distinct_views(self.images[i], size, self.center_crop, self.random_flip) for i, size in self.views)
        for size in dict.fromkeys(size for _, size in self.views):
            count += sum(distinct_views(image, size, self.center_crop, self.random_flip) for image in self.class_images)
        return count

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng((self.seed, index))
        i, size = self.views[index % len(self.views)]
        mask = self.masks[i] if self.masks is not None else None
        control = self.controls[i] if self.controls is not None else None
        if self.sources is not None:  # cropped and flipped with the image, as a control is (one or the other)
            control = self.sources[i]
        pixels, geometry = to_tensor_with_geometry(self.images[i], size, self.center_crop, self.random_flip, rng, mask,
                                                   control)  # fmt: skip
        if self.sources is not None:
            geometry["source_values"] = geometry.pop("control_values")
        item = {"pixel_values": pixels, "prompts": self.prompts[i], **geometry}
        if self.captions is not None and self.captions.active:
            prompt, dropped = self.captions(self.prompts[i], caption_rng(self.seed, index))
            item["prompts"] = prompt
            if self.captions.dropout > 0:
                item["drop_condition"] = torch.tensor(dropped)
        if self.labels is not None:
            item["class_labels"] = self.labels[i]
        if self.class_images:
            j = index % len(self.class_images)
            pixels, geometry = to_tensor_with_geometry(
                self.class_images[j], size, self.center_crop, self.random_flip, rng
            )
            item["class_pixel_values"] = pixels
            item["class_prompts"] = self.class_prompts[j]
            if self.class_image_labels is not None:  # the prior half's labels (DreamBooth reads "class_" keys)
                item["class_class_labels"] = self.class_image_labels[j]
            item["class_original_size"] = geometry["original_size"]
            item["class_crop_top_left"] = geometry["crop_top_left"]
            if "mask" in item:
                item["class_mask"] = torch.ones_like(item["mask"])
            if "drop_condition" in item:
                item["class_drop_condition"] = torch.tensor(False)
        return item


#: Why a run has no ``data.instance_dir``: the experiments hold no data, a data config gives it.
MISSING_INSTANCE_DIR = (
    "data.instance_dir is missing: give a data config: configs/data/embedded_subject.yaml for the embedded subject, "
    "configs/data/embedded_domain.yaml for the embedded domain, configs/data/my_subject.yaml for your photos (or "
    "--data.instance_dir)"
)


def check_data_settings(h) -> None:
    """Reject ``LimitedDataModule`` settings that cannot mean anything, naming the key and the value."""
    # First: an experiment run without its data config lacks every data key, and this one says what to add.
    if h.instance_dir is None:
        raise ValueError(MISSING_INSTANCE_DIR)
    if h.instance_prompt is not None and not h.instance_prompt.strip():
        raise ValueError(f"data.instance_prompt={h.instance_prompt!r} is empty: give the prompt, or omit it (captions)")
    if h.class_prompt is not None and not h.class_prompt.strip():
        raise ValueError(f"data.class_prompt={h.class_prompt!r} is empty: give the class prompt, or omit it")
    if h.num_class_images < 0:
        raise ValueError(f"data.num_class_images={h.num_class_images}: must be >= 0 (0 = no prior preservation)")
    if h.num_class_images > 0 and not h.class_prompt and h.class_image_label is None:
        raise ValueError(
            "data.num_class_images > 0 needs data.class_prompt (the prompt of the class images) or, for a "
            "class-conditional model, data.class_image_label (their class)"
        )
    if h.class_image_label is not None and h.class_image_label < 0:
        raise ValueError(f"data.class_image_label={h.class_image_label}: must be >= 0")
    for key in ("repeats", "batch_size"):
        if h[key] <= 0:
            raise ValueError(f"data.{key}={h[key]}: must be > 0")
    resolutions = resolution_list(h.resolution)
    if not resolutions or any(isinstance(r, bool) or not isinstance(r, int) or r <= 0 for r in resolutions):
        raise ValueError(f"data.resolution={h.resolution}: must be a side > 0 in pixels, or a list of them")
    if h.buckets is not None:
        parse_buckets(h.buckets)
        if len(resolutions) > 1:
            raise ValueError(f"data.buckets and data.resolution={h.resolution}: the buckets given replace the "
                             "resolutions' own; give one of the two")  # fmt: skip
    if h.bucket_step is not None and h.bucket_step <= 0:
        raise ValueError(f"data.bucket_step={h.bucket_step}: must be > 0")
    check_caption_settings(h.caption_dropout, h.shuffle_tags, h.keep_tokens, h.tag_separator)
    if h.validation_images is not None:
        if not h.sample_prompts or len(h.sample_prompts) != len(h.validation_images):
            raise ValueError(f"data.validation_images holds {len(h.validation_images)} control images: give as many "
                             "data.sample_prompts, one per control image (diffusers' --validation_prompt)")  # fmt: skip
    if h.control_dir and h.num_class_images > 0:
        raise ValueError(f"data.control_dir with data.num_class_images={h.num_class_images}: class images have no "
                         "control images; ControlNet training has no prior preservation (set it to 0)")  # fmt: skip
    if h.source_dir and h.control_dir:
        raise ValueError(f"data.source_dir={h.source_dir!r} and data.control_dir={h.control_dir!r}: source images are "
                         "an editing model's, control images a ControlNet's; give the one the model reads")  # fmt: skip
    if h.source_dir and h.num_class_images > 0:
        raise ValueError(f"data.source_dir with data.num_class_images={h.num_class_images}: class images have no "
                         "source images; editing models train without prior preservation, as diffusers' Kontext "
                         "script (set it to 0)")  # fmt: skip
    if h.mask_dir and h.alpha_mask:
        raise ValueError(f"data.mask_dir={h.mask_dir!r} and data.alpha_mask=true both give the loss masks: set one")
    if h.bucket_max_aspect < 1:
        raise ValueError(f"data.bucket_max_aspect={h.bucket_max_aspect}: must be >= 1 (1 = square buckets only)")
    if h.num_workers < 0:
        raise ValueError(f"data.num_workers={h.num_workers}: must be >= 0")
    if h.class_label is not None and h.class_label < 0:
        raise ValueError(f"data.class_label={h.class_label}: must be >= 0")
    if not h.predict_seeds:
        raise ValueError("data.predict_seeds=[]: predict needs at least one seed")


def ignore_stop_signals(worker_id: int) -> None:
    """In data-loader workers: leave SIGTERM and SIGINT to the main process. A scheduler that signals every process
    (SLURM) would otherwise kill the workers, and torch would fail the run before it saves its checkpoint."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LimitedDataModule(L.LightningDataModule):
    """Few-shot training data from an image folder.

    Args:
        instance_dir: folder of training images: any format Pillow opens (PNG, JPEG, WebP, TIFF, AVIF, BMP, the
            first frame of a GIF, ...); other files are skipped, and listed in ``skipped_files.txt`` in the run's
            log folder. Required: a data config gives it (None fails naming the data configs).
        instance_prompt: caption for every instance image, used when there is no ``captions_file`` and no
            per-image ``.txt`` (e.g. ``"a sks orange star on a gray background"``).
        captions_file: ``.jsonl`` (``{"file": ..., "caption": ...}`` per line) or ``.csv`` (``file,caption``). Rows
            of a jsonl file may also carry an integer ``"label"``: the image's class for class-conditional models.
        class_dir: folder of class images for prior preservation (default None: only generated ones).
        class_prompt: prompt of the class images (e.g. ``"a orange star on a gray background"``); enables prior
            preservation together with ``num_class_images``.
        num_class_images: class images wanted (default 0 = no prior preservation); the shortfall of ``class_dir``
            is sampled from the pretrained model and cached on disk.
        class_cache_dir: where generated class images are cached (default: the project cache).
        class_label: integer label for class-conditional models, given to every instance image (default None: the
            labels of the captions file).
        class_image_label: the class of the prior-preservation images of a class-conditional model, sampled from
            the pretrained model with that label (its ``class_prompt``; default None).
        resolution: training resolution in pixels (default 512), or several (``[512, 768]``): every image is then a
            view at each of them (in buckets). Class images, the memory bank and FID use the largest.
        center_crop: centre crop (default True) instead of a random crop.
        random_flip: horizontal flip with probability 0.5 (default False).
        repeats: how many times the instance set is repeated in one epoch (default 100), so an epoch is not 4 steps.
        batch_size: instance images per batch (default 1); with prior preservation a batch holds as many class images.
        num_workers: dataloader workers (default 0: images are read in the training process; on a GPU, 2-8
            workers read the next batches while the step runs).
        pin_memory: page-locked batches, copied to a GPU faster and asynchronously (default None: on when the
            trainer runs on CUDA).
        seed: augmentation and shuffling seed (default 0).
        predict_prompts: prompts for ``predict`` (default: the instance prompts); each drawn once per seed.
        predict_seeds: seeds for ``predict`` (default [0, 1, 2, 3]).
        heldout_dir: held-out images of the target, never trained on (default None): the corruption-stage monitor's
            ceiling and the FID reference set, unless those callbacks name their own; without them both fall back
            to the instance images, and say so.
        sample_prompts: prompts the sample grids (and the export's model card) show, one row each (default None:
            the first distinct instance captions and the class prompt).
        sample_labels: class labels the sample grids show, for class-conditional models (default None: the first
            distinct labels of the data).
        aspect_buckets: group the images into aspect-ratio buckets (default False: square crops): buckets of about
            ``resolution**2`` pixels, sides multiples of ``bucket_step``; each image goes to the bucket nearest its
            aspect ratio, is resized (aspect kept) to cover it and cropped to it; every batch is from one bucket.
        buckets: the buckets themselves, ``[[w, h], ...]`` (default None: derived from ``resolution``); implies
            ``aspect_buckets``.
        bucket_step: the sides' multiple (default None: the model's latent factor x 8, as kohya's 64 for SD, and a
            multiple of what its denoiser needs; 64 without a model).
        bucket_max_aspect: the widest aspect ratio of a derived bucket (default 4.0: kohya's 256-1024 px range at
            512).
        mask_dir: folder of loss masks, one per image with the same file name stem (default None): the denoising
            loss is weighted by the mask (white = trained, black = ignored) at latent resolution.
        alpha_mask: use each image's alpha channel as its loss mask (default False); images without one are fully
            trained, with a warning.
        caption_dropout: probability of training an instance image with the null condition of the model's family
            (the empty prompt, the null class), drawn per item from ``(seed, index)`` (default 0.0).
        shuffle_tags: shuffle the ``tag_separator``-separated tags of each caption per item (default False).
        keep_tokens: how many leading tags stay in place when shuffling (default 0; kohya's ``keep_tokens``).
        tag_separator: what separates tags in a caption (default ``","``).
        control_dir: ControlNet training (``model.trainable: controlnet``): a folder of control images, one per
            training image with its file name stem (default None); or a ``conditioning_image`` field per row of the
            captions file (a path relative to it), diffusers' dataset convention. See ``lightning_ft.data.controls``.
        source_dir: editing models (FLUX.1 Kontext, Qwen-Image-Edit): a folder of source images, one per training
            image with its file name stem (default None): each training image is the edit of its source; or a
            ``cond_image`` field per row of the captions file (a path relative to it). See
            ``lightning_ft.data.controls``.
        validation_images: control images (a ControlNet's) or source images (an editing model's) the sample grids
            (and ``predict``) sample with, paired with ``sample_prompts`` (diffusers' ``--validation_image`` /
            ``--validation_prompt``; default None).

    ``validate`` and ``test`` score the model on the instance images without augmentation (how well it fits the
    subject, at fixed timesteps and noise); ``predict`` generates ``predict_prompts`` x ``predict_seeds``.
    """

    def __init__(
        self,
        instance_dir: str | None = None,
        instance_prompt: str | None = None,
        captions_file: str | None = None,
        class_dir: str | None = None,
        class_prompt: str | None = None,
        num_class_images: int = 0,
        class_cache_dir: str | None = None,
        class_label: int | None = None,
        class_image_label: int | None = None,
        resolution: int | list[int] = 512,
        center_crop: bool = True,
        random_flip: bool = False,
        repeats: int = 100,
        batch_size: int = 1,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        seed: int = 0,
        predict_prompts: list[str] | None = None,
        predict_seeds: list[int] = [0, 1, 2, 3],
        heldout_dir: str | None = None,
        sample_prompts: list[str] | None = None,
        sample_labels: list[int] | None = None,
        aspect_buckets: bool = False,
        buckets: list[list[int]] | None = None,
        bucket_step: int | None = None,
        bucket_max_aspect: float = MAX_ASPECT,
        mask_dir: str | None = None,
        alpha_mask: bool = False,
        caption_dropout: float = 0.0,
        shuffle_tags: bool = False,
        keep_tokens: int = 0,
        tag_separator: str = ",",
        control_dir: str | None = None,
        validation_images: list[str] | None = None,
        source_dir: str | None = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        check_data_settings(self.hparams)
        self.dataset: LimitedDataset | None = None
        self._instances: tuple | None = None  # (files, prompts, images, labels) once read by check_inputs
        self._class_user: tuple = ([], [])  # data.class_dir's (files, images) used, once read by check_inputs
        #: (config key, path, why) of every entry of the data folders that is not used, once read by check_inputs.
        self.skipped: list[tuple[str, Path, str]] = []
        self._warned: set[str] = set()  # check_inputs runs twice under the CLI: each warning once
        self.views: list | None = None  # (image index, (w, h)) of every instance view when bucketed, by check_inputs
        self.masks = None  # one L image per instance image with data.mask_dir / data.alpha_mask, by check_inputs
        self.controls = None  # one RGB control image per instance image (ControlNet training), by check_inputs
        self.sources = None  # one RGB source image per instance image (editing models), by check_inputs

    # ----------------------------------------------------------------------------------------------- sizes
    @property
    def resolutions(self) -> list[int]:
        """The training resolutions (``data.resolution``, one or several)."""
        return resolution_list(self.hparams.resolution)

    @property
    def sampling_resolution(self) -> int:
        """The side images sampled for training (class images, a memory bank) and the FID images have: the largest
        training resolution (views at smaller ones are resized down from them)."""
        return max(self.resolutions)

    @property
    def bucketed(self) -> bool:
        """Whether views come in several sizes (aspect buckets, given buckets or several resolutions): batches are
        then drawn bucket by bucket."""
        h = self.hparams
        return bool(h.aspect_buckets or h.buckets is not None or len(self.resolutions) > 1)

    def bucket_step(self, module=None) -> int:
        """``data.bucket_step``, or the model's latent factor x 8 (kohya's 64 for SD's factor 8), rounded up to a
        multiple of what its denoiser needs; 64 without a model."""
        if self.hparams.bucket_step is not None:
            return self.hparams.bucket_step
        if module is None or not hasattr(module, "vae_scale_factor"):
            return 64
        multiple = module.family.resolution_multiple(module.parts) or 1
        return math.lcm(module.vae_scale_factor() * 8, multiple)

    def _make_views(self, module=None) -> None:
        """The bucketed views of the instance images (``self.views``), checked against ``module``'s sizes."""
        h = self.hparams
        if not self.bucketed:
            self.views = None
            return
        images = self._instances[2]
        explicit = parse_buckets(h.buckets) if h.buckets is not None else None
        step = self.bucket_step(module)
        views = build_views([image.size for image in images], self.resolutions, bool(h.aspect_buckets or explicit),
                            explicit, step, h.bucket_max_aspect)  # fmt: skip
        if module is not None and hasattr(module, "family"):
            multiple = module.family.resolution_multiple(module.parts)
            # Every bucket given is checked, used or not (another folder would use it); else the buckets used.
            sizes = sorted(set(explicit) if explicit else {size for _, size in views})
            if multiple is None:
                side = module.native_resolution()
                if sizes != [(side, side)]:
                    raise ValueError(
                        f"data: buckets {sizes} but this model only takes {side}x{side} images (a fixed positional "
                        "grid): set data.aspect_buckets=false and one data.resolution"
                    )
            bad = [f"{w}x{h}" for w, h in sizes if w % multiple or h % multiple] if multiple else []
            if bad:
                key = "data.buckets" if explicit else "data.bucket_step"
                raise ValueError(f"{key}: buckets {', '.join(bad)} have sides that are not multiples of {multiple}, "
                                 "which this model needs")  # fmt: skip
        if self.views != views and rank_zero_only.rank == 0:
            print(f"lightning-ft: data buckets (step {step} px): {describe_buckets(views, len(images))}", flush=True)
        self.views = views

    # ----------------------------------------------------------------------------------------- class images
    def _user_class_files(self) -> list[Path]:
        h = self.hparams
        if not h.class_dir:
            return []
        if not Path(h.class_dir).exists():
            # A typo here would otherwise silently mean "generate every class image".
            raise FileNotFoundError(f"data.class_dir: folder {h.class_dir!r} does not exist (omit it to generate all)")
        return list_images(h.class_dir, "data.class_dir")[: h.num_class_images]

    def _generated_class_folder(self) -> Path | None:
        h = self.hparams
        shortfall = h.num_class_images - len(self._user_class_files())
        if shortfall <= 0:
            return None
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or not hasattr(module, "generate"):
            raise ValueError(
                f"data: {shortfall} class images are missing and there is no DiffusionBase model to generate them"
            )
        root = Path(h.class_cache_dir) if h.class_cache_dir else None
        # The images depend on how they are sampled too: another sampler, step count or guidance must not reuse them.
        model_hparams = getattr(module, "hparams", {})
        sampler = {k: model_hparams.get(k) for k in SAMPLER_HPARAMS}
        return class_cache_folder(
            self._class_inputs(module, 1).values()[0],
            module.model_identity(),
            shortfall,
            self.sampling_resolution,
            h.seed,
            root,
            sampler=sampler,
        )

    def _class_inputs(self, module, count: int):
        """What the class images are sampled with (a ``SampleInputs`` of ``count``): the class prompt, or the class
        label of a class-conditional model; the model's family says which, and names the setting when missing."""
        h = self.hparams
        prompts = [h.class_prompt] * count if h.class_prompt else None
        labels = [h.class_image_label] * count if h.class_image_label is not None else None
        where = ("data.num_class_images > 0 needs data.class_prompt (the prompt of the class images; a "
                 "class-conditional model: data.class_image_label, the class they are sampled with)")  # fmt: skip
        return module.family.sample_inputs(prompts, labels, count, where=where)

    def _sample_class_images(self, folder: Path | None) -> None:
        # In setup, on every rank: the missing class images are sampled once, split across the ranks.
        if folder is not None and self.trainer is not None:
            shortfall = self.hparams.num_class_images - len(self._user_class_files())
            module = self.trainer.lightning_module
            # setup runs before the strategy moves the model: sample on the accelerator, not on the CPU.
            module.to(self.trainer.strategy.root_device)
            inputs = self._class_inputs(module, shortfall)
            # At the training resolution, not a pipeline default (1024 px for a Flux config without a sample size).
            at = module.sampling_at(self.sampling_resolution) if hasattr(module, "sampling_at") else nullcontext()
            with at:
                generate_class_images(module, inputs, folder, seed=self.hparams.seed, trainer=self.trainer)

    # ----------------------------------------------------------------------------------------------- setup
    def check_inputs(self, module=None) -> None:
        """Read the instance folder, its captions, labels and every image now, and check them against ``module`` (the
        model, if known: its resolution and conditioning), failing with every bad file named at once. The CLI calls
        this before anything is written; ``setup`` reuses what it read.

        Args:
            module: the model the data is for (default None: only the data is checked).
        """
        h = self.hparams
        if self._instances is None:
            files = list_images(h.instance_dir, "data.instance_dir")
            prompts = read_captions(files, h.captions_file, h.instance_prompt, "data.instance_dir")
            images = load_images(files, "data.instance_dir")
            # A class_dir typo fails here too, and every class image used is read now: a bad one is named before any
            # class image is sampled or cached.
            class_files = self._user_class_files()
            self._class_user = (class_files, load_images(class_files, "data.class_dir") if class_files else [])
            labels = [h.class_label] * len(files) if h.class_label is not None else None
            if labels is None:
                labels = read_labels(files, h.captions_file, "data.captions_file")
            # Caption files in the folder are used, not skipped: the per-image .txt, or a captions file kept there.
            captions = [Path(h.captions_file)] if h.captions_file else [f.with_suffix(".txt") for f in files]
            captions = [c for c in captions if c.parent.resolve() == Path(h.instance_dir).resolve() and c.exists()]
            used = [*files, *captions]
            self.skipped = [("data.instance_dir", p, why) for p, why in skipped_files(h.instance_dir, used)]
            if class_files:
                self.skipped += [("data.class_dir", p, why) for p, why in skipped_files(h.class_dir, class_files)]
            if rank_zero_only.rank == 0:
                line = describe_folder(h.instance_dir, files, captions, "data.instance_dir")
                print(f"lightning-ft: {line}", flush=True)
                if class_files:
                    line = describe_folder(h.class_dir, class_files, (), "data.class_dir")
                    print(f"lightning-ft: {line}", flush=True)
            # Masks are read and matched to the images now: a missing or mis-sized one is named before anything runs.
            self.masks = read_masks(files, h.mask_dir, h.alpha_mask, "data")
            self.controls = read_controls(files, images, h.control_dir, h.captions_file, "data")
            if self.controls is not None and h.num_class_images > 0:
                raise ValueError("data: the captions file gives control images and data.num_class_images > 0: class "
                                 "images have none; ControlNet training has no prior preservation")  # fmt: skip
            self.sources = read_sources(files, images, h.source_dir, h.captions_file, "data")
            if self.sources is not None and self.controls is not None:
                raise ValueError("data: the data gives both control images and source images: give the one the "
                                 "model reads")  # fmt: skip
            if self.sources is not None and h.num_class_images > 0:
                raise ValueError("data: the captions file gives source images and data.num_class_images > 0: class "
                                 "images have none; editing models train without prior preservation")  # fmt: skip
            self._instances = (files, prompts, images, labels)
            captions = caption_setting_warnings(h.caption_dropout, h.shuffle_tags, h.keep_tokens, h.tag_separator,
                                                prompts, caption_sources(files, h.captions_file))  # fmt: skip
            self._warn(self._data_warnings() + mask_warnings(files, self.masks) + captions)
        if module is not None and hasattr(module, "check_resolution"):
            for resolution in self.resolutions:
                module.check_resolution(resolution)
        self._make_views(module)
        if module is not None and hasattr(module, "trainable_parameters"):
            has_controlnet = getattr(module, "controlnet", None) is not None
            if has_controlnet and self._instances is not None and self.controls is None:
                raise ValueError("model.trainable='controlnet' needs control images: data.control_dir, or a "
                                 "conditioning_image field in data.captions_file")  # fmt: skip
            if self.controls is not None and not has_controlnet:
                raise ValueError("data: control images are given (data.control_dir or a conditioning_image field) but "
                                 "the model has no ControlNet: set model.trainable='controlnet'")  # fmt: skip
        family = getattr(module, "family", None)
        if family is not None and self._instances is not None:
            if family.needs_source and self.sources is None:
                raise ValueError(f"data: the {family.name} family is an editing model: give the source image of "
                                 "every training image (data.source_dir, or a cond_image field in "
                                 "data.captions_file)")  # fmt: skip
            if self.sources is not None and not family.needs_source:
                raise ValueError(f"data: source images are given (data.source_dir or a cond_image field) but the "
                                 f"{family.name} family is not an editing model")  # fmt: skip
        if self._instances[3] is None and family is not None and family.needs_labels():
            raise ValueError(
                "data: this model is class-conditional; give data.class_label, or a jsonl data.captions_file "
                "whose rows carry an integer 'label'"
            )
        if module is not None:
            self._warn(token_warnings(module, self._prompt_sources()))

    # -------------------------------------------------------------------------------------------- odd inputs
    def _data_warnings(self) -> list[str]:
        """What is odd in the data read (see ``odd_inputs``): skipped images Pillow cannot open, tiny or very long
        images, duplicates, a prompt that captions override or that equals the class prompt."""
        h = self.hparams
        (files, prompts, images, _), (class_files, class_images) = self._instances, self._class_user
        messages = unsupported_warnings(self.skipped)
        messages += image_warnings(files, images, self.sampling_resolution, "data.instance_dir")
        messages += image_warnings(class_files, class_images, self.sampling_resolution, "data.class_dir")
        messages += duplicate_warnings(
            [("data.instance_dir", files, images), ("data.class_dir", class_files, class_images)]
        )
        sources = caption_sources(files, h.captions_file)
        messages += caption_warnings(h.instance_prompt, h.class_prompt, h.num_class_images > 0, prompts, sources,
                                     files, h.captions_file)  # fmt: skip
        return messages

    def _prompt_sources(self) -> dict[str, str]:
        """Every distinct prompt trained on -> where it comes from (a key or a caption file), for ``token_warnings``."""
        h = self.hparams
        files, prompts = self._instances[0], self._instances[1]
        sources = caption_sources(files, h.captions_file) or ["data.instance_prompt"] * len(files)
        found: dict[str, str] = {}
        for prompt, source in zip(prompts, sources):
            found.setdefault(prompt, source)
        if h.num_class_images > 0 and h.class_prompt:
            found.setdefault(h.class_prompt, "data.class_prompt")
        return found

    def _warn(self, messages: list[str]) -> None:
        for message in messages:
            if message not in self._warned:
                self._warned.add(message)
                rank_zero_warn(f"lightning-ft: {message}")

    def _list_skipped(self) -> None:
        """Write every skipped file (the folder line names five of each kind) to ``skipped_files.txt`` in the run's
        log folder, and say where."""
        if not self.skipped or self.trainer is None or not hasattr(self.trainer, "log_dir"):
            return
        log_dir = self.trainer.log_dir  # on every rank: under DDP the trainer broadcasts rank 0's
        if log_dir is None or rank_zero_only.rank != 0:
            return
        path = Path(log_dir) / "skipped_files.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("folder key\twhy\tpath\n" + "".join(f"{k}\t{why}\t{p}\n" for k, p, why in self.skipped))
        print(f"lightning-ft: all {len(self.skipped)} skipped entries of the data folders (files and subfolders) are "
              f"listed in {path}", flush=True)  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        h = self.hparams
        module = self.trainer.lightning_module if self.trainer is not None else None
        self.check_inputs(module)
        files, prompts, images, labels = self._instances
        class_images, class_prompts, class_image_labels = None, None, None
        if h.num_class_images > 0:
            folder = self._generated_class_folder()  # hashes the model's files: once per setup
            self._sample_class_images(folder)
            class_images = list(self._class_user[1])  # data.class_dir's, read by check_inputs
            if folder is not None:
                key = "data.class_cache_dir (generated class images)"
                class_images += load_images(list_images(folder, key), key)
            class_prompts = [h.class_prompt or ""] * len(class_images)
            if h.class_image_label is not None:
                class_image_labels = [h.class_image_label] * len(class_images)
        self.dataset = LimitedDataset(
            images,
            prompts,
            class_images,
            class_prompts,
            self.resolutions[0],
            h.center_crop,
            h.random_flip,
            h.repeats,
            h.seed,
            labels,
            class_image_labels,
            views=self.views,
            masks=self.masks,
            captions=self._captions(),
            controls=self.controls,
            sources=self.sources,
        )
        self._list_skipped()

    def _captions(self) -> CaptionAugment:
        h = self.hparams
        return CaptionAugment(h.caption_dropout, h.shuffle_tags, h.keep_tokens, h.tag_separator)

    def _instances_in_order(self) -> DataLoader:
        """Every instance view once, centre-cropped, in order (with its mask): validation and test. Bucketed views go
        in batches of one bucket each."""
        h = self.hparams
        d = self.dataset
        plain = LimitedDataset(d.images, d.prompts, resolution=d.resolution, center_crop=True, seed=h.seed,
                               labels=d.labels, views=d.views, masks=d.masks, controls=d.controls,
                               sources=d.sources)  # fmt: skip
        kwargs = dict(num_workers=h.num_workers, pin_memory=self.pin_memory())
        if not self.bucketed:
            return DataLoader(plain, batch_size=h.batch_size, **kwargs)
        sizes = [plain.size_of(i) for i in range(len(plain))]
        batches = BucketBatchSampler(None, h.batch_size, False, sizes, h.seed, shuffle=False)
        return DataLoader(plain, batch_sampler=batches, **kwargs)

    def val_dataloader(self) -> DataLoader:
        return self._instances_in_order()

    def test_dataloader(self) -> DataLoader:
        return self._instances_in_order()

    def sample_controls(self) -> torch.Tensor | None:
        """The control (or source) images of ``data.validation_images`` at the (largest) training resolution,
        (N, 3, R, R) in [0, 1], one per ``sample_prompts`` row; None without them."""
        paths = self.hparams.validation_images
        return load_validation_controls(list(paths), self.sampling_resolution) if paths else None

    def sample_sources(self, count: int) -> torch.Tensor | None:
        """The source images an editing model's grid rows are edits of, (count, 3, R, R) in [0, 1] at the (largest)
        training resolution: ``data.validation_images`` (one per ``sample_prompts`` row), else the sources of the
        first ``count`` training images (cycled), centre-cropped; None without sources."""
        if self.hparams.validation_images:
            return self.sample_controls()
        if self.sources is None:
            return None
        side = self.sampling_resolution
        picked = [self.sources[i % len(self.sources)] for i in range(count)]
        return torch.stack([(to_tensor_with_geometry(s, side, True, False, None)[0] + 1) / 2 for s in picked])

    def predict_dataloader(self) -> DataLoader:
        h = self.hparams
        if self.dataset.controls is not None:  # a ControlNet samples the validation pairs (control, prompt)
            controls = self.sample_controls()
            if controls is None:
                raise ValueError("predict with a ControlNet needs data.validation_images and data.sample_prompts")
            items = [{"prompts": p, "controls": c, "seeds": s} for p, c in zip(h.sample_prompts, controls)
                     for s in h.predict_seeds]  # fmt: skip
            return DataLoader(items, batch_size=max(h.batch_size, 8))
        if self.dataset.sources is not None:  # an editing model samples the validation pairs (source, prompt)
            sources = self.sample_controls()
            if sources is None:
                raise ValueError("predict with an editing model needs data.validation_images (source images) and "
                                 "data.sample_prompts")  # fmt: skip
            items = [{"prompts": p, "sources": c, "seeds": s} for p, c in zip(h.sample_prompts, sources)
                     for s in h.predict_seeds]  # fmt: skip
            return DataLoader(items, batch_size=max(h.batch_size, 8))
        prompts = h.predict_prompts or list(dict.fromkeys(self.dataset.prompts))
        if self.dataset.labels is not None:  # class-conditional models sample the classes, not the prompts
            labels = list(dict.fromkeys(self.dataset.labels))
            items = [{"prompts": f"class {c}", "class_labels": c, "seeds": s} for c in labels for s in h.predict_seeds]
        else:
            items = [{"prompts": p, "seeds": s} for p in prompts for s in h.predict_seeds]
        return DataLoader(items, batch_size=max(h.batch_size, 8))

    def pin_memory(self) -> bool:
        """``pin_memory``, or auto: on when the trainer's device is a CUDA GPU."""
        if self.hparams.pin_memory is not None:
            return self.hparams.pin_memory
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        # StatefulDataLoader (torchdata): Lightning saves its position and sampler state in checkpoints, so a run
        # resumed mid-epoch continues with the next batch of the same order instead of restarting the epoch.
        kwargs = dict(num_workers=h.num_workers, persistent_workers=h.num_workers > 0, pin_memory=self.pin_memory(),
                      worker_init_fn=ignore_stop_signals)  # fmt: skip
        order = EpochSeededRandomSampler(len(self.dataset), h.seed)
        if self.bucketed:
            # Every batch from one bucket; the batch sampler reads the epoch from ``order`` (Lightning sets it there).
            sizes = [self.dataset.size_of(i) for i in range(len(self.dataset))]
            batches = BucketBatchSampler(order, h.batch_size, False, sizes, h.seed)
            return StatefulDataLoader(self.dataset, batch_sampler=batches, **kwargs)
        return StatefulDataLoader(self.dataset, batch_size=h.batch_size, sampler=order, drop_last=False, **kwargs)
