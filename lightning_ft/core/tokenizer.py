"""A word-level tokenizer built offline from a vocabulary, for text encoders trained by the project.

Stable Diffusion ships its CLIP tokenizer; a model pretrained here from scratch needs one that can be made with
no hub. A ``tokenizers`` WordLevel model wrapped as ``PreTrainedTokenizerFast`` saves to a folder that
``transformers.AutoTokenizer.from_pretrained`` loads, so the exported pipeline needs nothing from this project.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def build_word_tokenizer(words: Sequence[str], model_max_length: int = 16) -> PreTrainedTokenizerFast:
    """Tokenizer over ``words`` (lower-cased, split on whitespace and punctuation) with pad/unk/bos/eos.

    Every sequence is wrapped as ``<bos> ... <eos>``; unknown words map to ``<unk>``. ``model_max_length`` must not
    exceed the text encoder's ``max_position_embeddings``."""
    bad = [w for w in words if not isinstance(w, str)]
    if bad:
        raise TypeError(
            f"tokenizer words must be strings, got {bad[:5]} (YAML reads on/off/yes/no unquoted as booleans)"
        )
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for word in sorted({w.lower() for w in words}):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>",
        special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=model_max_length,
    )
