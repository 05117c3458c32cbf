"""What scores the samples, chosen from what the model declares (``lightning_ft.json``), and the per-sample scores.

- Subject fidelity: the model's ``identity`` backbone (the embedded world: its feature network; a model that
  declares none: DINO ViT-S/16, DreamBooth's DINO).
- CLIP-I and CLIP-T: one full CLIP model (``lightning_ft.metrics.CLIPTextScore``: image and text towers), the
  ``prompt`` role's when it is ``clip`` (else a ``condition`` role named ``clip``), else the paper's ViT-L/14 by hub
  id; not for the embedded world, which has no CLIP: its prompt fidelity is the feature network's attribute accuracy
  (``lightning_ft.embedded.prompts``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lightning_ft.evaluation.statistics import leave_one_out, mean_similarity
from lightning_ft.metrics import CLIPTextScore, features
from lightning_ft.metrics.backbones import DEFAULT_CHECKPOINTS, FeatureExtractor, backbone_spec, make_backbone

#: Backbones named under this prefix are the embedded world's (its feature network): it has no CLIP.
EMBEDDED = "lightning_ft.embedded."
CLIP_T = "CLIP-T"
ACCURACY = "prompt accuracy"


@dataclass
class Scorers:
    """The backbones of one evaluation and what each is (for the table's notes)."""

    identity: FeatureExtractor
    identity_text: str
    clip: CLIPTextScore | None = None
    clip_text: str | None = None
    accuracy_net: torch.nn.Module | None = None  # the embedded world's attribute classifier
    prompt_metric: str | None = None  # CLIP_T, ACCURACY or None
    prompt_text: str | None = None
    notes: list[str] = field(default_factory=list)

    # ---------------------------------------------------------------------------------------- per sample
    def bounds(self, metric: str) -> tuple[float, float]:
        """The range of a metric's per-sample score: cosines in [-1, 1], the prompt accuracy in [0, 1]."""
        return (0.0, 1.0) if metric == "prompt_fidelity" and self.prompt_metric == ACCURACY else (-1.0, 1.0)

    def identity_features(self, images: torch.Tensor) -> torch.Tensor:
        return features(images, self.identity)

    def clip_features(self, images: torch.Tensor) -> torch.Tensor | None:
        return None if self.clip is None else self.clip.image_embeddings(images).cpu()

    def prompt_scores(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor | None:
        """Per image, the fidelity to its prompt: CLIP-T, or the share of the attributes its prompt names that the
        embedded feature network sees (NaN when the prompt names none); None when nothing scores prompts."""
        if self.prompt_metric == CLIP_T:
            return self.clip.scores(images, prompts).cpu()
        if self.prompt_metric == ACCURACY:
            from lightning_ft.embedded.prompts import prompt_accuracy

            out = []
            for image, prompt in zip(images, prompts):
                result = prompt_accuracy(image[None], [prompt], net=self.accuracy_net)
                named = [v for k, v in result.items() if not k.startswith("n_") and not math.isnan(v)]
                out.append(sum(named) / len(named) if named else float("nan"))
            return torch.tensor(out, dtype=torch.float64)
        return None

    def score(self, samples: torch.Tensor, prompts: list[str], references: torch.Tensor) -> dict:
        """Per-sample scores of ``samples`` (float images in [0, 1]) against ``references``: ``subject_fidelity``,
        ``clip_i`` (or None) and ``prompt_fidelity`` (or None), each (N,)."""
        ref_identity = self.identity_features(references)
        ref_clip = self.clip_features(references)
        samples_clip = self.clip_features(samples)
        return {
            "subject_fidelity": mean_similarity(self.identity_features(samples), ref_identity).cpu(),
            "clip_i": None if ref_clip is None else mean_similarity(samples_clip, ref_clip),
            "prompt_fidelity": self.prompt_scores(samples, prompts),
        }

    def score_references(self, references: torch.Tensor, prompt: str | None, what: str) -> dict:
        """The real-images row: each reference against the others (leave-one-out); its prompt fidelity against
        ``prompt`` (the instance prompt; None: not scored)."""
        ref_clip = self.clip_features(references)
        prompt_scores = self.prompt_scores(references, [prompt] * len(references)) if prompt else None
        return {
            "subject_fidelity": leave_one_out(self.identity_features(references), what).cpu(),
            "clip_i": None if ref_clip is None else leave_one_out(ref_clip, what),
            "prompt_fidelity": prompt_scores,
        }


def _is_embedded(entry: dict | None) -> bool:
    return bool(entry) and str(entry.get("name", "")).startswith(EMBEDDED)


def clip_source(declared: dict, clip: str | None) -> tuple[str | None, str]:
    """(path or hub id of the CLIP model, why that one), or (None, why none) from the model's declaration and the
    ``--clip`` option."""
    if clip:
        return clip, "given with --clip"
    for role in ("prompt", "condition"):
        entry = declared.get(role)
        if entry and entry["name"] == "clip":
            return entry.get("path") or DEFAULT_CHECKPOINTS["clip"], f"the model's declared {role} backbone"
    prompt = declared.get("prompt")
    if prompt:
        return None, (f"the model declares {prompt['name']!r} for the prompt role, not a CLIP model; --clip PATH "
                      "scores CLIP-I and CLIP-T with one")  # fmt: skip
    if _is_embedded(declared.get("identity")):
        return None, "the embedded world has no CLIP model (--clip PATH adds one)"
    return DEFAULT_CHECKPOINTS["clip"], "the papers' CLIP ViT-L/14: the model declares none"


def make_scorers(
    declared: dict,
    backbone: str = "auto",
    backbone_path: str | None = None,
    clip: str | None = None,
    no_clip: bool = False,
    device: str | torch.device = "cpu",
) -> Scorers:
    """The scorers of a model that declares ``declared`` (``declared_backbones(folder)``); ``backbone`` /
    ``backbone_path`` override the identity backbone, ``clip`` the CLIP model, ``no_clip`` skips CLIP."""
    name, path = backbone_spec("identity", backbone, backbone_path, declared)
    if backbone != "auto":
        why = "given with --backbone"
    else:
        why = "declared by the model" if declared.get("identity") else "the papers' DINO ViT-S/16: none declared"
    identity = make_backbone(name, path, device=device)
    where = path or DEFAULT_CHECKPOINTS.get(name)
    scorers = Scorers(identity, f"{identity.name} ({name}{f', {where}' if where and where != name else ''}; {why})")
    clip_path, clip_why = (None, "skipped with --no-clip") if no_clip else clip_source(declared, clip)
    if clip_path is not None:
        scorers.clip = CLIPTextScore(clip_path, device=device)
        scorers.clip_text = f"CLIP {clip_path} ({clip_why})"
        scorers.prompt_metric = CLIP_T
        scorers.prompt_text = "CLIP-T: cosine of the CLIP image embedding with the CLIP text embedding of its prompt"
    else:
        scorers.notes.append(f"CLIP-I and CLIP-T not scored: {clip_why}.")
        if name.startswith(EMBEDDED):  # the identity network is the embedded world's: it also reads prompts
            from lightning_ft.embedded.backbones import load_net

            scorers.accuracy_net = load_net(path)
            scorers.prompt_metric = ACCURACY
            scorers.prompt_text = (
                "the embedded world's prompt accuracy (the CLIP-T role): the share of the attributes a prompt names "
                f"(shape, colour, background) that its feature network ({path or 'the shipped one'}) sees in the sample"
            )
        else:
            scorers.notes.append("Prompt fidelity not scored: no CLIP model and no other prompt score for this model.")
    return scorers
