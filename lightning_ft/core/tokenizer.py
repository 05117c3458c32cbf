"""A word-level tokenizer built offline from a vocabulary, for text encoders trained by the project.

Stable Diffusion ships its CLIP tokenizer; a model pretrained here from scratch needs one that can be made with
no hub. A ``tokenizers`` WordLevel model wrapped as ``PreTrainedTokenizerFast`` saves to a folder that
``transformers.AutoTokenizer.from_pretrained`` loads, so the exported pipeline needs nothing from this project.
A pipeline that wraps prompts in a chat template (``ZImagePipeline``: ``tokenizer.apply_chat_template``) gets one with
``chat_template``; it is saved with the tokenizer (``chat_template.jinja``), so the export carries it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import AddedToken, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def build_word_tokenizer(
    words: Sequence[str],
    model_max_length: int = 16,
    chat_template: str | None = None,
    added_tokens: Sequence[str] = (),
    wrap: bool = True,
) -> PreTrainedTokenizerFast:
    """Tokenizer over ``words`` (lower-cased, split on whitespace and punctuation) with pad/unk/bos/eos.

    Every sequence is wrapped as ``<bos> ... <eos>`` (unless ``wrap=False``); unknown words map to ``<unk>``.
    ``model_max_length`` must not exceed the text encoder's ``max_position_embeddings``. ``chat_template`` (a Jinja
    template, default None): set as the tokenizer's chat template; its ``<|...|>`` markers become special tokens, one
    id each (else the punctuation split would cut them into pieces of ``<unk>``). ``added_tokens``: strings matched
    verbatim, one id each, before the text is split (a pipeline's own prompt template: ``QwenImagePipeline``'s
    ``<|im_start|>``, ``<|im_end|>`` and ``"\\n"``, which the whitespace split would drop); ``wrap=False``: no
    ``<bos>``/``<eos>`` around sequences (Qwen2's tokenizer adds none, and ``QwenImagePipeline`` drops a fixed count
    of template tokens from the front)."""
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
    if wrap:
        core.post_processor = processors.TemplateProcessing(
            single="<bos> $A <eos>",
            special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])],
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=model_max_length,
    )
    if chat_template is not None:
        markers = sorted(set(re.findall(r"<\|[^|<>]+\|>", chat_template)))
        tokenizer.add_tokens([AddedToken(m, special=True, normalized=False) for m in markers], special_tokens=True)
        tokenizer.chat_template = chat_template
    if added_tokens:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in added_tokens])
    return tokenizer
