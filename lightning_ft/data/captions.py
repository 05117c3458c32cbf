"""Caption augmentation on the data side: caption dropout and tag shuffling, as kohya's sd-scripts do them.

``data.caption_dropout`` (kohya ``caption_dropout_rate``): the probability that an instance image is trained with the
model's null condition (the empty prompt, the null class). The data only flags the item (``drop_condition``); the
model replaces the flagged rows' inputs by its family's null input (``EncodingMixin.encode_conditions``), so the one
null condition of the model is used, whatever the family.

``data.shuffle_tags`` (kohya ``shuffle_caption``): split the caption on ``data.tag_separator`` (kohya
``caption_separator``), strip the whitespace around each tag, drop empty tags (doubled or trailing separators), keep
the first ``data.keep_tokens`` tags (kohya ``keep_tokens``; counted after empty tags are dropped) in place, shuffle
the rest, and join with the separator followed by one space (", " for the default ","; a whitespace separator joins as
it is). Without ``shuffle_tags`` the caption is returned untouched.

Every draw comes from the generator the caller passes, seeded by ``(data.seed, item index, CAPTION_STREAM)``
(``caption_rng``), so an item's caption is the same whatever the worker count, and a resumed run sees the captions
the interrupted one would have. The draws, in this order (a change of it changes every run's captions):

1. with ``dropout > 0``: one ``rng.random()``; the item is dropped when it is ``< dropout``;
2. with ``shuffle_tags``: one ``rng.permutation(k)``, ``k`` the number of tags after the kept ones (also when ``k``
   is 0 or 1, and also for a dropped item: which draws are made depends on the settings, never on a draw).

With neither active nothing is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np

#: The third word of an item's caption seed ``(data.seed, index, CAPTION_STREAM)``: a stream of its own, apart from
#: the image augmentation's ``(data.seed, index)``, so that turning caption augmentation on or off leaves every crop
#: and flip as it was.
CAPTION_STREAM = 0xCA9


def caption_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of item ``index``'s caption draws under ``data.seed`` = ``seed``."""
    return np.random.default_rng((seed, index, CAPTION_STREAM))


def check_caption_settings(dropout: float, shuffle_tags: bool, keep_tokens: int, separator: str) -> None:
    """Reject caption settings that cannot mean anything, naming the key and the value."""
    if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0 <= dropout <= 1:
        raise ValueError(f"data.caption_dropout={dropout!r}: a probability must be in [0, 1] (0 = off)")
    if not isinstance(shuffle_tags, bool):
        raise ValueError(f"data.shuffle_tags={shuffle_tags!r}: must be true or false")
    if isinstance(keep_tokens, bool) or not isinstance(keep_tokens, Integral) or keep_tokens < 0:
        raise ValueError(f"data.keep_tokens={keep_tokens!r}: must be an integer >= 0 (the leading tags kept in place)")
    if not isinstance(separator, str) or not separator:
        raise ValueError(f"data.tag_separator={separator!r}: must be a non-empty string (e.g. ',')")


def split_tags(caption: str, separator: str) -> list[str]:
    """The tags of ``caption``: split on ``separator``, stripped, the empty ones dropped."""
    return [tag for tag in (part.strip() for part in caption.split(separator)) if tag]


def join_tags(tags: Sequence[str], separator: str) -> str:
    """``tags`` joined with ``separator`` and one space (", " for ","); a whitespace separator as it is."""
    joiner = separator.rstrip() + " " if separator.strip() else separator
    return joiner.join(tags)


def caption_setting_warnings(
    dropout: float,
    shuffle_tags: bool,
    keep_tokens: int,
    separator: str,
    captions: Sequence[str],
    sources: Sequence[str] | None = None,
) -> list[str]:
    """Caption settings that run but probably not as meant, one line each: ``keep_tokens`` without ``shuffle_tags``,
    ``shuffle_tags`` on captions of which none has two tags to shuffle (naming one), and a dropout of 1 (the captions
    are never seen). ``sources``: where each caption came from (``folder.caption_sources``; None: the prompt)."""
    messages = []
    if dropout >= 1:
        messages.append(
            f"data.caption_dropout={dropout!r} trains every instance image with the null condition, so its caption is "
            "never seen; a small rate (e.g. 0.05) is what teaches the unconditional branch"
        )
    if keep_tokens > 0 and not shuffle_tags:
        messages.append(
            f"data.keep_tokens={keep_tokens} does nothing without data.shuffle_tags=true (it keeps the first tags in "
            "place when the rest are shuffled, as kohya's keep_tokens): set data.shuffle_tags, or omit data.keep_tokens"
        )
    if shuffle_tags and captions:
        counts = [len(split_tags(c, separator)) for c in captions]
        if all(count - keep_tokens < 2 for count in counts):
            where = "data.instance_prompt" if sources is None else sources[0]
            if all(count <= 1 for count in counts):
                why = f"no caption holds data.tag_separator={separator!r}"
            else:
                why = f"no caption has two tags after the data.keep_tokens={keep_tokens} kept in place"
            messages.append(
                f"data.shuffle_tags=true: {why} (e.g. {captions[0]!r}, from {where}), so there is nothing to shuffle: "
                "write the captions as tags (e.g. 'sks dog, on grass, sunlight'), set data.tag_separator to the one "
                "they use, or omit data.shuffle_tags"
            )
    return messages


class CaptionAugment:
    """Caption dropout and tag shuffling of one item's caption (see the module docstring for the draws).

    Args:
        dropout: probability of flagging the item for the null condition (``data.caption_dropout``, default 0).
        shuffle_tags: shuffle the caption's tags (``data.shuffle_tags``, default False).
        keep_tokens: leading tags that stay in place when shuffling (``data.keep_tokens``, default 0).
        separator: what separates tags (``data.tag_separator``, default ",").
    """

    def __init__(self, dropout: float = 0.0, shuffle_tags: bool = False, keep_tokens: int = 0, separator: str = ","):
        check_caption_settings(dropout, shuffle_tags, keep_tokens, separator)
        self.dropout, self.shuffle_tags = float(dropout), shuffle_tags
        self.keep_tokens, self.separator = int(keep_tokens), separator

    @property
    def active(self) -> bool:
        """True when a call may change a caption or flag it (and so draws from the generator)."""
        return self.dropout > 0 or self.shuffle_tags

    def __call__(self, caption: str, rng: np.random.Generator) -> tuple[str, bool]:
        """``(caption, dropped)``: the caption, its tags shuffled with ``shuffle_tags``, and whether the item is to be
        trained with the null condition. A dropped item's caption is still returned (shuffled as usual): the model,
        not the caption, makes the null condition."""
        dropped = False
        if self.dropout > 0:
            dropped = bool(rng.random() < self.dropout)
        if self.shuffle_tags:
            tags = split_tags(caption, self.separator)
            kept, rest = tags[: self.keep_tokens], tags[self.keep_tokens :]
            order = rng.permutation(len(rest))
            caption = join_tags([*kept, *(rest[i] for i in order)], self.separator)
        return caption, dropped

    def __repr__(self) -> str:
        return (f"CaptionAugment(dropout={self.dropout}, shuffle_tags={self.shuffle_tags}, "
                f"keep_tokens={self.keep_tokens}, separator={self.separator!r})")  # fmt: skip
