"""Tokenize a long text only as far as its first tokens reach, so a row's cost follows what it keeps.

A row uses at most a few hundred (END, NONE) or a few thousand (CHUNK) of a document's tokens, but
a document may hold 200,000 characters; tokenizing it whole costs time and memory for tokens that
are thrown away. `TextCut` tokenizes a character prefix instead and keeps only tokens the rest of
the text cannot change:

- Tokenizers decide a token from nearby characters: its word (pre-token), a normalization unit (a
  character and its combining marks), an added token's spelling. So cutting a text changes only
  tokens near the cut: those of the word it splits (a whitespace-free run is one long word, and a
  tokenizer without a pre-tokenizer sees the whole text as one), a special token's spelling cut in
  half. BPE merges and Unigram's best path inside a cut word settle within a few tokens of the cut.
- A prefix is accepted once it gives at least `margin` tokens beyond those wanted; those near the
  cut are dropped. A WordPiece word of up to max_input_chars_per_word characters gives at most that
  many tokens (a longer one is a single [UNK] whatever its length), so the margin exceeds it.
- A prefix that gives too few tokens (whitespace, long [UNK] words, text denser than guessed) is
  doubled, up to the whole text, so the work is at most about twice tokenizing the text whole.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

CHARS_PER_TOKEN = 8  # a generous guess at characters per token, for sizing the first prefix
MARGIN_TOKENS = 128  # tokens past those kept that a prefix must give (more for long WordPiece words)
BATCH_TEXTS = 32  # texts tokenized at once: their encodings (every token's text too) live until done


class TextCut:
    """Each text's first token ids, from as short a prefix of it as gives them exactly."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        longest_word = getattr(tokenizer.model, "max_input_chars_per_word", 0)  # WordPiece only
        self.margin = max(MARGIN_TOKENS, longest_word + 1)

    def leading_ids(self, texts: Sequence[str], count: int) -> list[list[int]]:
        """The first `count` token ids of each text (all of them when it has fewer), as tokenizing the
        whole text without special tokens gives them."""
        ids: list[list[int]] = [[] for _ in texts]
        pending = list(range(len(texts)))
        chars = (count + self.margin) * CHARS_PER_TOKEN
        while pending:
            short: list[int] = []
            for start in range(0, len(pending), BATCH_TEXTS):
                group = pending[start : start + BATCH_TEXTS]
                prefixes = [texts[index][:chars] for index in group]
                # encode_batch_fast: no character offsets, which nothing here uses; a fifth less CPU.
                encodings = self._tokenizer.encode_batch_fast(prefixes, add_special_tokens=False)
                for index, prefix, encoding in zip(group, prefixes, encodings, strict=True):
                    tokens = encoding.ids
                    if len(prefix) == len(texts[index]) or len(tokens) >= count + self.margin:
                        ids[index] = tokens[:count]
                    else:
                        short.append(index)
            pending = short
            chars *= 2
        return ids
