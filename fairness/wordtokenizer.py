"""A word-level tokenizer built from a corpus; gendered-token counterpart maps for any tokenizer.

The demo teacher and its students use a word-level vocabulary (lower-cased words and punctuation
runs, the corpus's most frequent words plus every gendered word whose pair occurs in the corpus), so
that every gendered word is one token and a counterfactual swap is a token-for-token permutation.
The tokenizer is saved as a `transformers.PreTrainedTokenizerFast`: teacher and students are
ordinary `GPT2LMHeadModel` folders loadable with `from_pretrained`.

`counterpart_map` works over any tokenizer (the word-level one, GPT-2's byte-level BPE, ...): a pair
(male, female) is mapped at the token level for every surface form ("he", " he", "He", " He") that
is a single, known token on both sides. Words that split into several tokens in either form (with
GPT-2's BPE e.g. " waitress") are left unmapped, and so are forms whose token already belongs to
another pair: the map stays an involution.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from .wordpairs import WordPairs

UNK, PAD, EOS = "[UNK]", "[PAD]", "[EOS]"
WORD = re.compile(r"\w+|[^\w\s]+")  # the `Whitespace` pre-tokeniser's pattern


def build_word_tokenizer(
    text: str, vocab_size: int, pairs: WordPairs | None = None
) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer: special tokens, gendered words, then the top words.

    Every single-word pair (male, female) of `pairs` with at least one side in `text` gets both
    sides into the vocabulary, whatever `vocab_size` says, so that the counterfactual of any
    training text can be written with the same vocabulary.
    """
    counts = Counter(WORD.findall(text.lower()))
    vocab: dict[str, int] = {UNK: 0, PAD: 1, EOS: 2}
    if pairs is not None:
        for male, female in pairs.pairs:
            if "_" in male or "_" in female:
                continue  # phrases never are one word-level token
            if counts[male] or counts[female]:
                for word in (male, female):
                    vocab.setdefault(word, len(vocab))
    for word, _ in counts.most_common():
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=EOS,
        model_max_length=1_000_000_000,
    )


@dataclass(frozen=True)
class CounterpartMap:
    """Token-level gender counterparts: `ids[v]` is v's counterpart (v itself if not gendered).

    `ids` is an involution (a permutation of the vocabulary), so it maps a next-token distribution
    to another distribution. `context_ids` additionally rewrites the one-way pronouns (him -> her,
    hers -> his) and is used only to build counterfactual contexts, never on distributions.
    """

    ids: torch.Tensor
    context_ids: torch.Tensor
    pairs: tuple[tuple[int, int], ...]

    @property
    def gendered(self) -> torch.Tensor:
        """Boolean mask of the tokens that have a counterpart."""
        return self.ids != torch.arange(len(self.ids))

    def swap_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The counterfactual context, token for token (same length, positions aligned)."""
        return self.context_ids.to(input_ids.device)[input_ids]


def single_token(tokenizer: PreTrainedTokenizerBase, form: str) -> int | None:
    """The id of `form` if the tokenizer writes it as one known token, else None."""
    ids = tokenizer.encode(form, add_special_tokens=False)
    if len(ids) != 1 or ids[0] == tokenizer.unk_token_id:
        return None
    return int(ids[0])


def surface_forms(word: str) -> list[str]:
    """A gendered word's spellings in running text: bare, after a space, capitalised."""
    word = word.replace("_", " ")
    forms = [word, " " + word, word.capitalize(), " " + word.capitalize()]
    return list(dict.fromkeys(forms))


def counterpart_map(
    tokenizer: PreTrainedTokenizerBase, pairs: WordPairs, vocab_size: int | None = None
) -> CounterpartMap:
    """Map each gendered token to its counterpart's token, for every form that is one token each.

    `vocab_size` is the model's output size when it is larger than the tokenizer's (padded
    embedding tables); the extra ids map to themselves.
    """
    size = max(len(tokenizer), vocab_size or 0)
    ids = torch.arange(size)
    mapped: list[tuple[int, int]] = []
    for male, female in pairs.pairs:
        for m_form, f_form in zip(surface_forms(male), surface_forms(female)):
            m_id, f_id = single_token(tokenizer, m_form), single_token(tokenizer, f_form)
            if m_id is None or f_id is None or m_id == f_id:
                continue
            if int(ids[m_id]) == f_id:
                continue  # the same two tokens again (e.g. a lower-casing tokenizer's "He")
            if int(ids[m_id]) != m_id or int(ids[f_id]) != f_id:
                continue  # a token already paired elsewhere: keep the map an involution
            ids[m_id], ids[f_id] = f_id, m_id
            mapped.append((m_id, f_id))
    context_ids = ids.clone()
    for word, other in pairs.one_way.items():
        for w_form, o_form in zip(surface_forms(word), surface_forms(other)):
            w_id, o_id = single_token(tokenizer, w_form), single_token(tokenizer, o_form)
            if w_id is not None and o_id is not None and int(context_ids[w_id]) == w_id:
                context_ids[w_id] = o_id
    return CounterpartMap(ids=ids, context_ids=context_ids, pairs=tuple(mapped))
