"""The training loss of every method on SD-style (epsilon and v-prediction) and DiT tiny models, on one fixed batch
with fixed seeds: ``tests/core/test_loss_reference.py`` asserts that the numbers in ``data/loss_reference.json`` stay
the same, so a refactor of the core cannot change what SD1.x/2.x and DiT models train.

The JSON was written by ``python tests/core/loss_reference.py --write`` at the commit before the model-family
redesign; re-write it only for a change that is meant to change the objective, and say so in the commit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REFERENCE = HERE / "data" / "loss_reference.json"


def _batch(labels: bool) -> dict:
    from conftest import shapes

    images = []
    prompts = []
    for i in range(3):
        spec = shapes.spec_for_index(7, i)
        images.append(torch.from_numpy(shapes.render(spec, 32)).permute(2, 0, 1).float() / 127.5 - 1)
        prompts.append(spec.caption)
    batch = {"pixel_values": torch.stack(images), "prompts": prompts}
    batch["class_pixel_values"] = torch.stack(images).flip(-1)
    batch["class_prompts"] = ["a star"] * 3
    if labels:
        batch["class_labels"] = torch.tensor([1, 5, 9])
    return batch


def _cases():
    """(name, model config, method class name, kwargs, batch keys kept)."""
    sd = "tiny_t2i"
    full = ("pixel_values", "prompts", "class_pixel_values", "class_prompts")
    plain = ("pixel_values", "prompts")
    yield "sd_eps_dreambooth_prior", sd, "DreamBooth", {}, full
    yield "sd_v_dreambooth_prior", sd, "DreamBooth", {"prediction_type": "v_prediction"}, full
    yield "sd_eps_snr_offset_dropout", sd, "DreamBooth", {"snr_gamma": 5.0, "noise_offset": 0.1,
                                                          "condition_dropout": 0.5}, plain  # fmt: skip
    yield "sd_v_snr", sd, "DreamBooth", {"prediction_type": "v_prediction", "snr_gamma": 5.0}, plain
    yield "sd_lora", sd, "DreamBooth", {"trainable": "lora"}, full
    yield "sd_bnn_full", sd, "BayesianFineTuning", {"kl_weight": 1e-3, "kl_reduction": "mean"}, full
    yield "sd_bnn_lora", sd, "BayesianFineTuning", {"trainable": "lora", "kl_weight": 1e-3}, full
    yield "sd_diff_tuning", sd, "DiffTuning", {}, plain
    yield "sd_v_diff_tuning_weights", sd, "DiffTuning", {"prediction_type": "v_prediction",
                                                         "weighting": "loss_weight"}, plain  # fmt: skip
    yield "sd_sdft_prediction", sd, "SelfDistillationFineTuning", {}, plain
    yield "sd_v_sdft_lowpass", sd, "SelfDistillationFineTuning", {"prediction_type": "v_prediction",
                                                                  "distill_target": "lowpass_x0"}, plain  # fmt: skip
    yield "sd_a3fta", sd, "AdapterAttentionFineTuning", {}, full
    yield "sd_anl", sd, "ConditionTuning", {"anl_head_width": 8}, plain
    dit = "tiny_dit"
    labelled = ("pixel_values", "prompts", "class_labels")
    yield "dit_dreambooth_dropout", dit, "DreamBooth", {"condition_dropout": 0.5}, labelled
    yield "dit_diff_tuning", dit, "DiffTuning", {}, labelled
    yield "dit_sdft", dit, "SelfDistillationFineTuning", {}, labelled
    yield "dit_a3fta", dit, "AdapterAttentionFineTuning", {}, labelled


def compute() -> dict[str, dict[str, float]]:
    """Every case's training loss and logged parts (and the evaluation loss), from fixed seeds."""
    # One thread, as the reference was written: the stepped losses follow the sign of every gradient element, and a
    # reduction split over more threads adds in another order, which flips the sign of a few near-zero ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _compute()
    finally:
        torch.set_num_threads(threads)


def _compute() -> dict[str, dict[str, float]]:
    from conftest import tiny_backbones, tiny_components

    import lightning_ft.methods as methods

    results = {}
    for name, model, method, kwargs, keys in _cases():
        torch.manual_seed(0)
        module = getattr(methods, method)(
            components=tiny_components(model), backbones=tiny_backbones(model), sample_steps=2, **kwargs
        )
        if method == "DiffTuning":
            generator = torch.Generator().manual_seed(3)
            module.memory_bank = torch.randint(0, 256, (8, 3, 32, 32), generator=generator, dtype=torch.uint8)
        batch = {k: v for k, v in _batch(model == "tiny_dit").items() if k in keys}
        module.train()
        torch.manual_seed(1)
        loss, logs = module.training_loss(batch)
        # One plain SGD step, then the loss again: covers the gradient path (and makes a distillation term non-zero).
        loss.backward()
        with torch.no_grad():
            for p in module.trainable_parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad.sign()
        stepped, stepped_logs = module.training_loss(batch)
        module.eval()
        evaluation = module.evaluation_loss(batch, 2)
        results[name] = {"loss": loss.item(), "evaluation": evaluation.item(), "stepped": stepped.item()}
        results[name].update({k: v.item() for k, v in logs.items()})
        results[name].update({f"stepped {k}": v.item() for k, v in stepped_logs.items()})
    return results


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    values = compute()
    text = json.dumps(values, indent=1, sort_keys=True)
    if "--write" in sys.argv:
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(text + "\n")
    print(text)
