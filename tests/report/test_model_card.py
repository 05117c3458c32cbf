"""The export's model card: the Hub client's own parser reads its metadata back."""

from __future__ import annotations

from huggingface_hub import ModelCard

from lightning_ft.embedded import asset_path
from lightning_ft.report.model_card import CardFacts, base_model_id, settings_of, write_model_card


def _facts(pretrained, **kwargs) -> CardFacts:
    settings = {"trainable": "full", "lr": 1e-4, "prior_loss_weight": 1.0, "lora_rank": 4}
    return CardFacts(
        method="DreamBooth", method_path="lightning_ft.methods.dreambooth.DreamBooth",
        settings=settings_of(settings), pretrained=pretrained, pipeline_class="StableDiffusionPipeline", steps=300,
        instance_prompt="a sks dog", class_prompt="a dog", num_instance_images=5, num_class_images=50,
        resolution=512, metrics=[("FID", "41.20", "64 samples vs 2000 reference images, step 300")],
        verdict="corruption stage: none detected; verdict adapting; best step 300 (fidelity 0.805)",
        widget=[("a sks dog", "images/sample_0.png"), ("a sks dog on a beach", "images/sample_1.png")],
        sample_settings={"num_inference_steps": 25, "guidance_scale": 7.5}, **kwargs,
    )  # fmt: skip


def test_card_metadata_reads_back_with_the_hub_client(tmp_path):
    path = write_model_card(tmp_path, _facts("stabilityai/stable-diffusion-2-1"))
    card = ModelCard.load(path)
    data = card.data
    assert data.base_model == "stabilityai/stable-diffusion-2-1"
    assert data.instance_prompt == "a sks dog" and data.library_name == "diffusers"
    assert data.license == "other", "the base's license is not known here, and the card says so"
    assert "set the base model's license before publishing" in card.text
    assert data.tags == ["diffusers", "lightning-ft", "dream-booth", "stable-diffusion", "text-to-image"]
    assert data.widget == [{"text": "a sks dog", "output": {"url": "images/sample_0.png"}},
                           {"text": "a sks dog on a beach", "output": {"url": "images/sample_1.png"}}]  # fmt: skip
    for text in ("| `lr` | `0.0001` |", "5 instance images, prompt `a sks dog`", "50 class images",
                 "| FID | 41.20 |", "verdict adapting", "upload_folder(", "from_pretrained("):  # fmt: skip
        assert text in card.text, text
    assert "lora_rank" not in card.text, "LoRA settings only for LoRA training"


def test_a_local_base_gets_its_cards_license_and_no_hub_id(tmp_path):
    card = ModelCard.load(write_model_card(tmp_path, _facts(str(asset_path("shapes-t2i")), lora_only=True)))
    assert card.data.base_model is None, "a local folder has no hub id to name"
    assert card.data.license == "apache-2.0", "the embedded model's card declares it"
    assert "shapes-t2i: the embedded text-to-image model" in card.text and "load_lora_weights" in card.text
    assert "lora" in card.data.tags


def test_base_model_id():
    assert base_model_id("org/model") == "org/model"
    assert base_model_id("/cache/huggingface/hub/models--org--model-x/snapshots/abc123") == "org/model-x"
    assert base_model_id(str(asset_path("shapes-t2i"))) is None
    assert base_model_id(None) is None and base_model_id("a/b/c") is None
