"""PixArt-Sigma: conditions equal the pipeline's ``encode_prompt`` (T5 states and mask), the null condition is its
encoded empty negative prompt, the denoiser is called as the pipeline calls it, the export samples the same images
in plain diffusers (with the pipeline's own 300 tokens), the LoRA-only export goes back on a plain transformer, and
the family is recognised from a folder's model_index and from its components."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import perturb, tiny_components, tiny_module
from diffusers import DiffusionPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
from tokenizers import normalizers

from lightning_ft.core import DiffusionBase
from lightning_ft.core.conditions import Condition
from lightning_ft.core.families.inputs import SampleInputs
from lightning_ft.core.families.pixart import pipeline_max_sequence_length
from lightning_ft.methods import DreamBooth

PROMPTS = ["  A SKS Star on a gray background ", "a red circle"]


def pixart(**kwargs):
    return tiny_module(DreamBooth, "tiny_pixart", **kwargs)


def test_conditions_are_the_pipelines_encode_prompt_embeddings_and_mask():
    torch.manual_seed(0)
    module = pixart().eval()
    # Case-sensitive, as T5's sentencepiece tokenizer (the tiny word tokenizer lower-cases by itself).
    module.tokenizer.backend_tokenizer.normalizer = normalizers.Sequence([])
    assert module.family.name == "pixart_sigma"
    # The pipeline's default length, capped by the tiny tokenizer's 12.
    assert pipeline_max_sequence_length("PixArtSigmaPipeline") == 300 and module.family.max_sequence_length == 12
    pipe = module.build_pipeline()
    assert isinstance(pipe, PixArtSigmaPipeline)
    embeds, mask, _, _ = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=12)
    cond = module.encode_prompts(PROMPTS)
    torch.testing.assert_close(cond.fields["encoder_hidden_states"], embeds, rtol=0, atol=0)
    assert cond.fields["encoder_attention_mask"].dtype == mask.dtype == torch.long
    assert torch.equal(cond.fields["encoder_attention_mask"], mask)
    # <bos> + 7 words + <eos> of the first prompt, then padding the transformer must not attend to.
    assert cond.fields["encoder_attention_mask"][0].tolist() == [1] * 9 + [0] * 3
    # Lower-cased and stripped as the pipeline's text preprocessing: the same condition as the plain prompt.
    plain = module.encode_prompts(["a sks star on a gray background"])
    assert torch.equal(plain.fields["encoder_hidden_states"][0], cond.fields["encoder_hidden_states"][0])


def test_the_null_condition_is_the_pipelines_encoded_empty_negative_prompt():
    torch.manual_seed(0)
    module = pixart(condition_dropout=1.0)
    pipe = module.build_pipeline()
    _, _, negative, negative_mask = pipe.encode_prompt(PROMPTS, negative_prompt="", max_sequence_length=12)
    null = module.null_condition(2)
    torch.testing.assert_close(null.fields["encoder_hidden_states"], negative, rtol=0, atol=0)
    assert torch.equal(null.fields["encoder_attention_mask"], negative_mask)
    # Encoded, not zeros (unlike SDXL's default), and <bos> <eos> are attended to.
    assert null.fields["encoder_hidden_states"].abs().sum() > 0
    assert null.fields["encoder_attention_mask"][0].tolist() == [1, 1] + [0] * 10
    # Condition dropout trains exactly that branch.
    module.train()
    dropped = module.encode_conditions({"pixel_values": torch.zeros(2, 3, 32, 32), "prompts": PROMPTS})
    assert torch.equal(dropped.fields["encoder_hidden_states"], null.fields["encoder_hidden_states"])
    assert torch.equal(dropped.fields["encoder_attention_mask"], null.fields["encoder_attention_mask"])


def test_condition_cat_and_where_keep_the_integer_mask():
    torch.manual_seed(0)
    module = pixart().eval()
    cond, null = module.encode_prompts(PROMPTS), module.null_condition(2)
    both = Condition.cat([cond, null])
    assert both.fields["encoder_attention_mask"].dtype == torch.long and len(both) == 4
    assert torch.equal(both[2:].fields["encoder_attention_mask"], null.fields["encoder_attention_mask"])
    chosen = cond.where(torch.tensor([False, True]), null)
    assert chosen.fields["encoder_attention_mask"].dtype == torch.long
    assert torch.equal(chosen.fields["encoder_attention_mask"][0], cond.fields["encoder_attention_mask"][0])
    assert torch.equal(chosen.fields["encoder_attention_mask"][1], null.fields["encoder_attention_mask"][1])
    assert torch.equal(chosen.fields["encoder_hidden_states"][1], null.fields["encoder_hidden_states"][1])
    moved = cond.to(torch.float64)
    assert moved.fields["encoder_attention_mask"].dtype == torch.long
    assert moved.fields["encoder_hidden_states"].dtype == torch.float64


def test_the_denoiser_is_called_as_the_pipeline_calls_it():
    """One pipeline step (no guidance) captured at the transformer: ``predict`` on the same latents, timestep and
    prompts gives the mean half of the pipeline's output; the mask hides the padded tokens."""
    torch.manual_seed(0)
    module = pixart().eval()
    perturb(module)
    pipe = module.build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    seen = {}

    def keep(layer, args, kwargs, output):
        seen.update(x=args[0], t=kwargs["timestep"], out=output[0], added=kwargs["added_cond_kwargs"])

    hook = module.denoiser.register_forward_hook(keep, with_kwargs=True)
    pipe(PROMPTS, guidance_scale=1.0, num_inference_steps=1, output_type="latent", use_resolution_binning=False,
         max_sequence_length=12, generator=torch.Generator().manual_seed(0))  # fmt: skip
    hook.remove()
    assert seen["added"] == {"resolution": None, "aspect_ratio": None}
    assert seen["out"].shape[1] == 8  # learned sigma: 2 x 4 channels, the mean half is the prediction
    cond = module.encode_prompts(PROMPTS)
    with torch.no_grad():
        got = module.predict(seen["x"], seen["t"], cond)
        torch.testing.assert_close(got, seen["out"][:, :4], rtol=0, atol=1e-6)
        # The padded tokens are masked: other states there change nothing; attending to them changes the output.
        padded = cond.fields["encoder_attention_mask"] == 0
        noisy_pad = torch.where(padded[..., None], torch.randn_like(cond.fields["encoder_hidden_states"]),
                                cond.fields["encoder_hidden_states"])  # fmt: skip
        torch.testing.assert_close(
            module.predict(seen["x"], seen["t"], cond.replace(encoder_hidden_states=noisy_pad)), got, rtol=0, atol=1e-5
        )
        unmasked = cond.replace(encoder_attention_mask=torch.ones_like(cond.fields["encoder_attention_mask"]))
        assert not torch.allclose(module.predict(seen["x"], seen["t"], unmasked), got, atol=1e-4)


def test_the_export_reloads_in_plain_diffusers_with_the_same_images(tmp_path):
    torch.manual_seed(0)
    module = pixart()
    perturb(module)
    expected = module.generate(prompts=PROMPTS, seeds=[3, 4], guidance_scale=2.0)
    assert not torch.allclose(expected[0], expected[1])
    module.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtSigmaPipeline"
    assert index["transformer"] == ["diffusers", "PixArtTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe, PixArtSigmaPipeline)
    pipe.set_progress_bar_config(disable=True)
    # The pipeline's own defaults (300 tokens, its caption cleaning), binning off only because the tiny sample size
    # is outside its tables: the mask makes the padding length irrelevant.
    generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
    got = pipe(PROMPTS, guidance_scale=2.0, num_inference_steps=2, generator=generators, output_type="pt",
               use_resolution_binning=False).images  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # The folder is recognised from its model_index, and the module loaded from it samples the same images.
    reloaded = DiffusionBase(pretrained=str(tmp_path), sample_steps=2)
    assert reloaded.family.name == "pixart_sigma" and reloaded.parts.pipeline_class == "PixArtSigmaPipeline"
    again = reloaded.generate(prompts=PROMPTS, seeds=[3, 4], guidance_scale=2.0)
    torch.testing.assert_close(again, expected, rtol=0, atol=1e-5)


def test_lora_only_export_goes_back_on_a_plain_transformer(tmp_path):
    torch.manual_seed(0)
    module = pixart(trainable="lora", lora_rank=2, lora_alpha=4)
    # Default targets: q/k/v/out of self- and cross-attention (attn1, attn2) of every block.
    lora_layers = {n.rsplit(".lora_A", 1)[0] for n, _ in module.denoiser.named_parameters() if ".lora_A" in n}
    assert "transformer_blocks.0.attn2.to_k" in lora_layers and "transformer_blocks.1.attn1.to_out.0" in lora_layers
    perturb(module)
    expected = module.generate(prompts=PROMPTS, seeds=[0, 1], guidance_scale=1.5)
    module.save_pretrained(tmp_path / "lora", lora_only=True)
    assert (tmp_path / "lora" / "adapter_config.json").is_file()
    torch.manual_seed(0)
    pixart().save_pretrained(tmp_path / "base")  # the same random base the LoRA started from
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "base")
    base_images = module.family.sample(module, pipe, SampleInputs.of(prompts=PROMPTS), [0, 1], 2, 1.5)
    transformer = PixArtTransformer2DModel.from_pretrained(tmp_path / "base", subfolder="transformer")
    module.family.load_lora(transformer, tmp_path / "lora")
    pipe = PixArtSigmaPipeline.from_pretrained(tmp_path / "base", transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    got = module.family.sample(module, pipe, SampleInputs.of(prompts=PROMPTS), [0, 1], 2, 1.5)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(base_images, expected, atol=1e-3)  # the LoRA is what makes the difference


def test_what_is_not_pixart_sigma_is_refused(tmp_path):
    components = tiny_components("tiny_pixart")
    config = {**components["denoiser"]["config"], "use_additional_conditions": True}
    micro = {**components["denoiser"], "config": config}
    with pytest.raises(ValueError, match="use_additional_conditions"):
        DiffusionBase(components={**components, "denoiser": micro}, sample_steps=2)
    # A PixArt transformer with another text encoder is not taken for PixArt-Sigma (nor, by its adaLN timestep
    # table, for a class-conditional model).
    clip = tiny_components("tiny_t2i")
    with pytest.raises(NotImplementedError, match="T5EncoderModel"):
        DiffusionBase(components={**components, "text_encoder": clip["text_encoder"]}, sample_steps=2)
    # A PixArt-Alpha folder is refused, naming its pipeline.
    torch.manual_seed(0)
    pixart().save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["_class_name"] = "PixArtAlphaPipeline"
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(NotImplementedError, match="PixArtAlphaPipeline"):
        DiffusionBase(pretrained=str(tmp_path))


def test_other_image_sizes_are_multiples_of_a_patch():
    """PixArt's patch embedding recomputes its sin-cos grid for other sizes (Sigma trains multi-aspect)."""
    torch.manual_seed(0)
    module = pixart().eval()
    assert module.family.resolution_multiple(module.parts) == 2 * 2  # VAE factor 2 x patch 2
    module.check_resolution(48)
    with pytest.raises(ValueError, match="data.resolution=34 is not a multiple of 4"):
        module.check_resolution(34)
    cond = module.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        assert module.predict(torch.randn(1, 4, 24, 20), torch.tensor([500]), cond).shape == (1, 4, 24, 20)
