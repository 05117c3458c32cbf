"""HiDream-I1: a mixture-of-experts transformer read by four text encoders, on the flow-matching process.

Conditions and sampling follow ``HiDreamImagePipeline`` (diffusers/pipelines/hidream_image/pipeline_hidream_image.py),
training diffusers' DreamBooth-LoRA script (examples/dreambooth/train_dreambooth_lora_hidream.py):

- prompts as ``encode_prompt`` with the pipeline's ``max_sequence_length`` (128, the script's default too): the two
  CLIP encoders' projected pooled outputs concatenated (``pooled_embeds``; tokens padded to min(128, 218), not to the
  tokenizers' own length), T5's last hidden state under its attention mask and every hidden layer of the Llama 3.1
  causal LM but the embeddings (``hidden_states[1:]``) under its mask, both padded to min(128, the tokenizer's
  ``model_max_length``). The pipeline pads Llama with its end-of-text token (it sets ``tokenizer_4.pad_token`` to the
  eos token when built; so does the family, so the tokens do not depend on whether a pipeline was built first). The
  transformer reads the padded states without a mask, so they are kept whole. The Llama stack is (layers, B, L, D) in
  the pipeline; the text cache holds it batch-first (B, layers, L, D) and ``denoise`` turns it back. Each block of the
  transformer reads the Llama layer its ``llama_layers`` names. The empty prompt (null input, the pipeline's default
  negative) is encoded like any other;
- the transformer takes latents (B, C, H, W) (it patchifies 2x2 itself), the timestep 1000 sigma (the scheduler's
  timesteps, as pipeline and script pass them) and returns x0 - eps: pipeline and script negate it, and so does
  ``denoise`` (the framework's eps - x0). In training mode a transformer without ``force_inference_output`` returns its
  output per patch token (B, C, tokens, 4) and routes the MoE experts through their differentiable path; ``denoise``
  folds that layout back to (B, C, H, W). The script loads the transformer with ``force_inference_output=True``, whose
  MoE path runs the routed experts under ``torch.no_grad``: the same loss, but no gradient through the routed experts.
  lightning-ft keeps the model's own setting, so its gradients are the loss's (and full fine-tuning trains the experts);
- latents as the script makes them: a draw from the VAE posterior, then ``(z - shift_factor) * scaling_factor``;
- timesteps uniform (the script's ``weighting_scheme="none"``), sigmas from the model scheduler's shift. The script
  builds its table with ``shift=3.0`` whatever the model ships: the same for HiDream-I1-Full (UniPC with
  ``flow_shift`` 3) and -Fast (Euler, shift 3), not for -Dev (Euler, shift 6), where ``model.flow_shift: 3.0`` trains as
  the script does (the default trains where the pipeline samples). A scheduler with ``use_dynamic_shifting`` (no
  HiDream-I1 ships one) is sampled by the pipeline at exp(mu) of the transformer's ``max_seq`` tokens, trained here at
  exp(mu) of the image's tokens;
- sampling: classifier-free guidance neg + w (pos - neg) for w > 1, as lightning-ft's scale. ``HiDreamImagePipeline``
  samples at the area of its ``default_sample_size`` (128 latent px) whatever height and width it is asked, rescaled;
  the family sets that attribute of the pipeline it samples with to the side it samples at (the default side keeps
  the pipeline's 128);
- LoRA on the script's default ``to_k, to_q, to_v, to_out`` (the image stream of every attention), saved by
  ``HiDreamImageLoraLoaderMixin`` under ``transformer``.
"""

from __future__ import annotations

import torch

from lightning_ft.core.components import Components
from lightning_ft.core.families.base import FLOW, batch_timesteps, pipeline_max_sequence_length
from lightning_ft.core.families.text import SequenceLengthCall, TextFamily

_MODULE = "diffusers.models.transformers.transformer_hidream_image"
#: ``_get_clip_prompt_embeds``: CLIP tokens padded to min(max_sequence_length, 218).
CLIP_LIMIT = 218


class HiDream(SequenceLengthCall, TextFamily):
    """HiDream-I1 (module docstring): CLIP pooled, T5 and stacked Llama states; a MoE transformer; flow matching."""

    name = "hidream"
    pipelines = ("HiDreamImagePipeline",)
    pipeline_class = "HiDreamImagePipeline"
    refused = {
        "HiDreamImageEditingPipeline": "HiDream-E1 edits an input image by instruction (HiDream-ai's pipeline, not "
        "diffusers'), which lightning-ft does not train yet (HiDreamImagePipeline is)",
    }
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
    lora_prefix = "transformer"
    lora_targets = ("to_k", "to_q", "to_v", "to_out")
    # BNN (inferred, as for the other transformers): the image stream of every block (attention, MoE feed-forward);
    # not its adaLN modulation (the timestep's path) nor the text stream of the double blocks (to_*_t, ff_t).
    bnn_include = ("double_stream_blocks.*", "single_stream_blocks.*")
    bnn_exclude = ("*.adaLN_modulation.*", "*.to_q_t", "*.to_k_t", "*.to_v_t", "*.to_out_t", "*.ff_t.*")
    fsdp_blocks = (f"{_MODULE}:HiDreamImageTransformerBlock", f"{_MODULE}:HiDreamImageSingleTransformerBlock")
    #: The attention of every block (joint in the double-stream blocks, over image and text in the single ones).
    attention_names = ("attn1",)
    #: Its timestep embedder (the pooled text embedder beside it holds a TimestepEmbedding too).
    time_embedding = "t_embedder"
    processes = FLOW
    default_timestep_density = "uniform"
    #: HiDreamImagePipeline decodes (z / scaling_factor) + shift_factor: a VAE without one (SD's) means 0.
    vae_defaults = {"shift_factor": 0.0}
    #: ``HiDreamImagePipeline.default_sample_size`` (latent side): the transformer's config has no sample size.
    default_sample_size = 128

    @classmethod
    def matches(cls, parts: Components) -> bool:
        return type(parts.denoiser).__name__ == "HiDreamImageTransformer2DModel"

    def __init__(self, parts: Components, null_class: int | None = None):
        super().__init__(parts, null_class)
        missing = [k for k in self.text_encoders if parts.text_encoders.get(k) is None]
        if missing:
            raise ValueError(
                f"HiDream needs its four text encoders (two CLIP, T5, Llama 3.1) and their tokenizers; missing: "
                f"{', '.join(missing)}. The pipeline's example and the script load the Llama apart from the HiDream "
                "folder: give model.components.text_encoder_4 {class: LlamaForCausalLM, pretrained: "
                "meta-llama/Meta-Llama-3.1-8B-Instruct} and tokenizer_4 {class: PreTrainedTokenizerFast, pretrained: "
                "the same}"
            )
        # HiDreamImagePipeline.__init__ pads Llama with its eos token; set here so that tokens never depend on
        # whether a pipeline was built before.
        parts.tokenizer_4.pad_token = parts.tokenizer_4.eos_token
        self.max_sequence_length = pipeline_max_sequence_length(self.pipeline_class)

    # --------------------------------------------------------------------------------------------- encoding
    def token_length(self, parts: Components, key: str) -> int:
        if key in ("tokenizer", "tokenizer_2"):
            return min(self.max_sequence_length, CLIP_LIMIT)
        return min(self.max_sequence_length, parts.tokenizers[key].model_max_length)

    def tokenize(self, parts: Components, prompts) -> list[torch.Tensor]:
        """``[clip ids, clip_2 ids, t5 ids, t5 mask, llama ids, llama mask]``, padded as the pipeline pads them."""
        out = []
        for key in ("tokenizer", "tokenizer_2", "tokenizer_3", "tokenizer_4"):
            length = self.token_length(parts, key)
            tokens = parts.tokenizers[key](list(prompts), padding="max_length", max_length=length, truncation=True,
                                           return_tensors="pt")  # fmt: skip
            masked = key in ("tokenizer_3", "tokenizer_4")  # T5 and Llama read their masks; CLIP reads none
            out += [tokens.input_ids, tokens.attention_mask] if masked else [tokens.input_ids]
        return out

    def encode_ids(self, parts: Components, ids: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        clip, clip_2, t5, t5_mask, llama, llama_mask = ids
        pooled = torch.cat([parts.text_encoder(clip)[0], parts.text_encoder_2(clip_2)[0]], dim=-1)
        states = parts.text_encoder_3(t5, attention_mask=t5_mask)[0]
        # As _get_llama3_prompt_embeds, without the attention maps it also asks for (they change no state) and with
        # the logits of the last position only (none are read).
        out = parts.text_encoder_4(llama, attention_mask=llama_mask, output_hidden_states=True, logits_to_keep=1)
        layers = torch.stack(out.hidden_states[1:], dim=1)  # (B, layers, L, D): batch first for the text cache
        return {"pooled_embeds": pooled, "encoder_hidden_states_t5": states, "encoder_hidden_states_llama3": layers}

    def denoise(self, denoiser, noisy, t, cond):
        out = denoiser(
            hidden_states=noisy,
            timesteps=batch_timesteps(t, noisy),
            encoder_hidden_states_t5=cond.fields["encoder_hidden_states_t5"],
            encoder_hidden_states_llama3=cond.fields["encoder_hidden_states_llama3"].transpose(0, 1),
            pooled_embeds=cond.fields["pooled_embeds"],
            return_dict=False,
        )[0]
        if out.shape != noisy.shape:  # training mode: (B, C, tokens, p * p)
            out = self.fold(out, *noisy.shape[-2:], denoiser.config.patch_size)
        return -out  # x0 - eps -> the framework's eps - x0 (pipeline and script negate too)

    @staticmethod
    def fold(out: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
        """The transformer's training-mode output (B, C, tokens, p * p), tokens row-major over the (h/p, w/p) patch
        grid (a non-square one padded to ``max_seq``), as latents (B, C, h, w): its inference-mode unpatchify."""
        b, c = out.shape[:2]
        rows, cols = h // p, w // p
        grid = out[:, :, : rows * cols].reshape(b, c, rows, cols, p, p)
        return grid.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)

    # ---------------------------------------------------------------------------------------- sizes
    def latent_size(self, parts: Components) -> int:
        return self.default_sample_size

    def resolution_multiple(self, parts: Components) -> int:
        # The pipeline's vae_scale_factor * 2 (2x2 patches).
        return self.vae_scale_factor(parts) * parts.denoiser.config.patch_size

    # ------------------------------------------------------------------------------------- sampling
    def sample(self, module, pipe, inputs, seeds, steps, guidance, negative_prompt=None):
        """The pipeline's call at the side lightning-ft samples at: its ``default_sample_size`` set to match (module
        docstring), then put back."""
        before = pipe.default_sample_size
        pipe.default_sample_size = module.native_resolution() // pipe.vae_scale_factor
        try:
            return super().sample(module, pipe, inputs, seeds, steps, guidance, negative_prompt)
        finally:
            pipe.default_sample_size = before

    def describe(self) -> str:
        return f"{self.name} (text-to-image, CLIP x2 + T5 + Llama 3.1, {self.max_sequence_length} tokens)"
