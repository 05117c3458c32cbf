"""DreamBench-style evaluation of a fine-tuned model (``python -m lightning_ft.evaluate``): N prompts x M images,
subject fidelity (the identity backbone; CLIP-I) against held-out references and prompt fidelity (CLIP-T, or the
embedded world's prompt accuracy), each with its count and 95% interval, and the references' own leave-one-out
scores as the ceiling.

- ``source``: what is evaluated (a run folder or an export), its prompts and references, the model loaded back;
- ``scoring``: the backbones, chosen from what the model declares, and the per-sample scores;
- ``statistics``: means with t-intervals, leave-one-out similarity;
- ``output``: ``evaluation.json``, ``evaluation.md`` and ``grid.png``.
"""

from lightning_ft.evaluation.scoring import Scorers, make_scorers
from lightning_ft.evaluation.source import choose_prompts, choose_references, load_model, resolve_target
from lightning_ft.evaluation.statistics import Estimate, estimate, leave_one_out, mean_similarity, t_quantile

__all__ = [
    "Estimate",
    "Scorers",
    "choose_prompts",
    "choose_references",
    "estimate",
    "leave_one_out",
    "load_model",
    "make_scorers",
    "mean_similarity",
    "resolve_target",
    "t_quantile",
]
