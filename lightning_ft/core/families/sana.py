"""Sana: a Gemma-conditioned linear-attention transformer on a deep-compression autoencoder, trained by flow matching.

Everything follows ``SanaPipeline`` (diffusers/pipelines/sana/pipeline_sana.py), so that the conditions trained on
are the ones the pipeline samples with, and diffusers' Sana DreamBooth-LoRA script
(examples/dreambooth/train_dreambooth_lora_sana.py) where the pipeline says nothing about training:

- prompts are lower-cased and stripped (``_text_preprocessing`` with ``clean_caption=False``, the default of
  ``encode_prompt`` and ``__call__``; sampling passes ``clean_caption=False`` too);
- the complex human instruction (CHI): ``__call__`` prepends ``"\\n".join(complex_human_instruction)`` to every
  prompt by default (its default list, read from the signature; ``encode_prompt``'s own default is None). Training
  uses the same instruction (``Sana.complex_human_instruction``, default the pipeline's), so the conditions trained
  on are the ones a plain ``pipe(prompt)`` of the export samples with, and the ones Sana was pretrained with
  (NVlabs' train script prepends its config's ``chi_prompt`` the same way). diffusers' DreamBooth script defaults
  to no instruction and then passes ``complex_human_instruction=None`` to its validation pipeline; set the
  attribute to None for that. Sampling here always passes the family's instruction explicitly;
- tokenised right-padded, ``padding="max_length"``, truncated, to ``max_length_all`` = ``max_sequence_length``, or
  with the CHI ``len(tokenizer.encode(chi)) + max_sequence_length - 2``; ``max_sequence_length`` is the pipeline's
  300, or the tokenizer's ``model_max_length`` when shorter (the tiny word tokenizers of the tests);
- Gemma2's last hidden state, computed with the tokenizer's attention mask over the whole sequence (the CHI
  included: the causal encoder's prompt states depend on it), then ``select_index = [0] + range(-L + 1, 0)``
  (L = ``max_sequence_length``): the first token (<bos>) and the last L - 1 positions of states *and* mask, which
  drops the instruction (with a word tokenizer that adds <bos> ... <eos>, exactly the prompt's tokens are left);
- states and mask are ``encoder_hidden_states`` / ``encoder_attention_mask`` (the transformer turns the mask into a
  -10000 bias), per-sample ``Condition`` fields;
- the unconditional branch is the pipeline's negative branch: the empty prompt encoded *without* the instruction
  (``complex_human_instruction=False``) and without ``select_index``, L tokens. The null input ``""`` (condition
  dropout, guidance, retention on unconditional samples) is encoded that way, so it trains the branch guidance uses;
  ``tokenize`` flags those rows, and ``encode_ids`` encodes them apart at their own length, as the pipeline does;
- the transformer is called as the pipeline calls it: ``timestep`` = the scheduler's timestep expanded to the batch
  times ``transformer.config.timestep_scale`` (1.0 for Sana). The pipeline's DPM-Solver over flow sigmas gives
  timesteps ``int(1000 sigma)``; ``FlowMatchingProcess.model_timesteps`` gives 1000 sigma, as the DreamBooth script
  passes (the Euler flow scheduler's ``sigmas * 1000``), so only ``timestep_scale`` is applied here. True CFG: no
  guidance embedding (a transformer built with ``guidance_embeds`` is Sana-Sprint's, whose ``SanaSprintPipeline``
  passes a guidance value that ``SanaPipeline`` never passes: refused);
- ``AutoencoderDC`` is deterministic (no ``latent_dist``: ``encode_images`` takes ``.latent``), latents are scaled by
  ``scaling_factor`` and the pipeline decodes ``latents / scaling_factor``; its spatial compression is
  2 ** (len(encoder_block_out_channels) - 1), the pipeline's ``vae_scale_factor``;
- training uses the Euler flow of the scheduler's ``flow_shift`` (``noise_process_for``); sampling and export keep
  the model's ``DPMSolverMultistepScheduler`` (``use_flow_sigmas``); the timestep density defaults to uniform (the
  script's ``weighting_scheme="none"``);
- sampling and export go through ``SanaPipeline`` with ``use_resolution_binning=False`` (at the native square size
  binning maps the size onto itself; outside its tables, the tiny models' sample sizes, the pipeline raises);
  sides must be multiples of 32 (``check_inputs``);
- LoRA: diffusers' ``SanaLoraLoaderMixin`` (``save_lora_weights(transformer_lora_layers=...,
  transformer_lora_adapter_metadata=...)``, loaded with ``load_lora_adapter(prefix="transformer")`` or the
  pipeline's ``load_lora_weights``), on the script's default targets ``to_k``, ``to_q``, ``to_v``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch

from lightning_ft.core.components import Components
from lightning_ft.core.conditions import Condition
from lightning_ft.core.families.base import (
    FLOW,
    TRANSFORMER_BNN_EXCLUDE,
    TRANSFORMER_BNN_INCLUDE,
    batch_timesteps,
    pipeline_max_sequence_length,
)
from lightning_ft.core.families.text import SequenceLengthCall, TextFamily

#: ``SanaPipeline.check_inputs``: height and width must be multiples of 32.
PIXEL_MULTIPLE = 32


def pipeline_complex_human_instruction(pipeline_class: str = "SanaPipeline") -> list[str]:
    """The ``complex_human_instruction`` default of the pipeline's ``__call__`` (what a plain call prepends)."""
    import diffusers

    signature = inspect.signature(getattr(diffusers, pipeline_class).__call__)
    return list(signature.parameters["complex_human_instruction"].default)


class Sana(SequenceLengthCall, TextFamily):
    """Sana (module docstring): Gemma2 states and mask with the complex human instruction, DC-AE, flow matching."""

    name = "sana"
    pipelines = ("SanaPipeline",)
    refused = {
        "SanaSprintPipeline": "the guidance-distilled Sana-Sprint is not implemented yet (SanaPipeline is)",
        "SanaPAGPipeline": "perturbed-attention guidance sampling is not implemented yet (SanaPipeline is)",
        "SanaControlNetPipeline": "ControlNet training is not in lightning-ft yet",
    }
    pipeline_class = "SanaPipeline"
    lora_prefix = "transformer"
    # diffusers' Sana DreamBooth-LoRA default (--lora_layers unset): q/k/v of self- and cross-attention.
    lora_targets = ("to_k", "to_q", "to_v")
    bnn_include = TRANSFORMER_BNN_INCLUDE
    bnn_exclude = TRANSFORMER_BNN_EXCLUDE
    fsdp_blocks = ("diffusers.models.transformers.sana_transformer:SanaTransformerBlock",)
    processes = FLOW
    #: diffusers' Sana DreamBooth-LoRA script: ``--weighting_scheme none`` (uniform timesteps, unweighted loss).
    default_timestep_density = "uniform"
    #: Linear self-attention ``attn1`` and the text cross-attention ``attn2`` of every block.
    attention_names = ("attn1", "attn2")

    @classmethod
    def matches(cls, parts: Components) -> bool:
        return type(parts.denoiser).__name__ == "SanaTransformer2DModel"

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        if parts.text_encoder is None or parts.tokenizer is None:
            raise ValueError("Sana needs its Gemma2 text encoder and tokenizer (model.components.text_encoder)")
        config = parts.denoiser.config
        if getattr(config, "guidance_embeds", False):
            raise ValueError(
                f"this {type(parts.denoiser).__name__} embeds a guidance value (guidance_embeds: Sana-Sprint's "
                "SanaSprintPipeline), which SanaPipeline never passes: it is not a Sana model"
            )
        self.tokens_per_latent = config.patch_size**2
        default = pipeline_max_sequence_length(self.pipeline_class)
        self.max_sequence_length = min(default, parts.tokenizer.model_max_length)
        # An export records an instruction other than the pipeline's (``export``); a reloaded export keeps it.
        call = dict(parts.declared.get("pipeline_call") or {})
        chi = call.get("complex_human_instruction", pipeline_complex_human_instruction(self.pipeline_class))
        #: The instruction prepended to prompts in training and sampling (None or []: none).
        self.complex_human_instruction: list[str] | None = list(chi) if chi else None

    # --------------------------------------------------------------------------------------------- encoding
    def _tokens(self, tokenizer, text: list[str], length: int):
        return tokenizer(
            text,
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            padding_side="right",
            return_tensors="pt",
        )

    def tokenize(self, parts: Components, prompts: Sequence[str]) -> list[torch.Tensor]:
        """``[input_ids, attention_mask, null]`` as ``_get_gemma_prompt_embeds`` makes them: ids and mask (B, L_all)
        (with the instruction, L_all = its token count + max_sequence_length - 2), and ``null`` (B, 1), 1 for the
        empty prompt, which is tokenised as the pipeline's negative branch (no instruction, max_sequence_length
        tokens, right-padded here to L_all with a zero mask). All three key the text cache."""
        tokenizer, length = parts.tokenizer, self.max_sequence_length
        text = [p.lower().strip() for p in prompts]
        null = torch.tensor([[int(not t)] for t in text], dtype=torch.long)
        if not self.complex_human_instruction:
            tokens = self._tokens(tokenizer, text, length)
            return [tokens.input_ids, tokens.attention_mask, null]
        chi = "\n".join(self.complex_human_instruction)
        length_all = len(tokenizer(chi, add_special_tokens=True, verbose=False).input_ids) + length - 2
        tokens = self._tokens(tokenizer, [chi + t for t in text], length_all)
        ids, mask = tokens.input_ids, tokens.attention_mask
        if null.any():
            empty = self._tokens(tokenizer, [""], length)
            pad = torch.full((1, length_all - length), tokenizer.pad_token_id, dtype=ids.dtype)
            rows = null[:, 0].bool()
            ids[rows] = torch.cat([empty.input_ids, pad], dim=1).to(ids.dtype)
            mask[rows] = torch.cat([empty.attention_mask, torch.zeros_like(pad)], dim=1).to(mask.dtype)
        return [ids, mask, null]

    def select_index(self, length_all: int) -> list[int]:
        """``encode_prompt``'s ``select_index``: the first token and the last ``max_sequence_length - 1``."""
        length = self.max_sequence_length
        return [0] + list(range(length_all - length + 1, length_all))

    def encode_ids(self, parts: Components, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        input_ids, mask, null = ids
        length = self.max_sequence_length
        rows = null[:, 0].bool() & bool(self.complex_human_instruction)
        states, masks = [None] * len(input_ids), [None] * len(input_ids)
        # The prompts (with the instruction): the whole sequence through the encoder, then select_index.
        if (~rows).any():
            index = torch.nonzero(~rows).flatten()
            select = self.select_index(input_ids.shape[1])
            out = parts.text_encoder(input_ids[index], attention_mask=mask[index])[0]
            for i, state, m in zip(index.tolist(), out[:, select], mask[index][:, select]):
                states[i], masks[i] = state, m
        # The empty prompt with an instruction configured: the negative branch, its own max_sequence_length tokens.
        if rows.any():
            index = torch.nonzero(rows).flatten()
            out = parts.text_encoder(input_ids[index, :length], attention_mask=mask[index, :length])[0]
            for i, state, m in zip(index.tolist(), out, mask[index, :length]):
                states[i], masks[i] = state, m
        return {"encoder_hidden_states": torch.stack(states), "encoder_attention_mask": torch.stack(masks)}

    def denoise(self, denoiser, noisy, t, cond: Condition):
        t = batch_timesteps(t, noisy)
        return denoiser(
            noisy,
            encoder_hidden_states=cond.fields["encoder_hidden_states"],
            encoder_attention_mask=cond.fields["encoder_attention_mask"],
            timestep=t * denoiser.config.timestep_scale,
        ).sample

    # ---------------------------------------------------------------------------------------- sizes
    def vae_scale_factor(self, parts: Components) -> int:
        """``SanaPipeline.vae_scale_factor``: the DC-AE's spatial compression (32 for Sana's)."""
        return 2 ** (len(parts.vae.config.encoder_block_out_channels) - 1) if parts.vae is not None else 32

    def resolution_multiple(self, parts: Components) -> int:
        """A patch in pixels (Sana has no positional grid by default; with ``interpolation_scale`` its sin-cos grid
        is recomputed for other sizes), and a multiple of 32 for the pipeline."""
        return math.lcm(PIXEL_MULTIPLE, self.vae_scale_factor(parts) * parts.denoiser.config.patch_size)

    # ------------------------------------------------------------------------------------- sampling, export
    def pipeline_call_kwargs(self, module) -> dict:
        """The ``SanaPipeline.__call__`` arguments sampling needs to match training: the native size, the token
        length and instruction trained with, no caption cleaning and no resolution binning."""
        return {
            **super().pipeline_call_kwargs(module),
            "complex_human_instruction": list(self.complex_human_instruction or []) or None,
            "clean_caption": False,
            "use_resolution_binning": False,
        }

    def negative_inputs(self, negative_prompt, n):
        return negative_prompt or ""  # the pipeline's own default: the empty prompt, without the instruction

    def export(self, parts: Components, scheduler, path) -> dict:
        record = super().export(parts, scheduler, path)
        if self.complex_human_instruction != pipeline_complex_human_instruction(self.pipeline_class):
            # Not what a plain call prepends: recorded, and read back when the export is loaded here.
            record = {**record, "pipeline_call": {"complex_human_instruction": self.complex_human_instruction}}
        return record

    def describe(self) -> str:
        chi = "with" if self.complex_human_instruction else "without"
        return f"{self.name} (text-to-image, Gemma2, {self.max_sequence_length} tokens, {chi} CHI)"
