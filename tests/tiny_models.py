"""Tiny, randomly initialized cross-encoders built offline, for tests that need real checkpoints.

Each builder derives a small vocabulary from CORPUS, wraps it in the transformers tokenizer class
the real checkpoints use (so AutoTokenizer reloads it the way it reloads them, and the tokenizer.json
it saves has their normalizer, pre-tokenizer and pair template), seeds torch, and saves weights,
config and tokenizer with save_pretrained. Same arguments, same files: the vocabularies are counted
from the corpus with the tokenizers' own normalizer and pre-tokenizer rather than trained, because
the `tokenizers` trainers break ties in hash order and gave a different vocabulary on every run.
A larger `initializer_range` than BERT's 0.02 spreads the scores, so tests can tell inputs apart.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from tokenizers import normalizers, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
    XLMRobertaTokenizer,
)

CORPUS = (
    "The giant panda is a bear species endemic to China.",
    "Pandas eat bamboo for most of the day and sleep in between meals.",
    "A reranker scores how well a passage answers a search query.",
    "Cross-encoders read the query and the document together in one pass.",
    "Bi-encoders embed the query and the document separately and compare the vectors.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "The stock market fell sharply on Monday after the interest rate decision.",
    "Mount Everest is the highest mountain above sea level on Earth.",
    "Regular exercise and a balanced diet improve long-term health.",
    "The recipe calls for two cups of flour, one egg and a pinch of salt.",
    "Python is a programming language known for its readable syntax.",
    "The library opens at nine in the morning and closes at six in the evening.",
    "Heavy rain is expected tomorrow, so bring an umbrella to the station.",
    "The museum displays paintings, sculptures and ancient coins from Rome.",
    "Electric cars use batteries instead of gasoline engines.",
    "Whales are mammals that breathe air and feed their young with milk.",
    "The train to London leaves from platform four every hour.",
    "Coffee beans are roasted before they are ground and brewed.",
    "What is the boiling point of water at sea level?",
    "How many legs does a spider have, and why do insects have six?",
    "Who wrote the novel about a white whale and a sea captain?",
    "Where do penguins live, and can they fly?",
    "When did the first person walk on the moon?",
    "Why is the sky blue during the day and red at sunset?",
    "Which planet in the solar system has the most moons?",
    "The committee will review every application before the end of the month.",
    "Children learn languages faster than adults according to several studies.",
    "A good night of sleep helps memory, mood and concentration.",
)
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
XLMR_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
# Word endings given their own pieces, so words outside the corpus split into more than characters.
SUFFIXES = ("s", "es", "ed", "er", "ing", "ly", "tion")


def _word_counts(
    split: pre_tokenizers.PreTokenizer, normalize: normalizers.Normalizer | None = None
) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in CORPUS:
        text = normalize.normalize_str(line) if normalize is not None else line
        counts.update(word for word, _ in split.pre_tokenize_str(text))
    return counts


def build_bert_cross_encoder(path: str | Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A BertForSequenceClassification with one logit and a WordPiece tokenizer giving token type ids."""
    words = _word_counts(pre_tokenizers.BertPreTokenizer(), normalizers.BertNormalizer(lowercase=True))
    characters = sorted({character for word in words for character in word})
    pieces = [
        *BERT_SPECIALS,
        *characters,
        *(f"##{character}" for character in characters),
        *(f"##{suffix}" for suffix in SUFFIXES),
        *sorted(word for word in words if len(word) > 1),
    ]
    # BertTokenizer builds BERT's normalizer, pre-tokenizer and [CLS] A [SEP] B:1 [SEP]:1 template.
    tokenizer = BertTokenizer(vocab={piece: index for index, piece in enumerate(dict.fromkeys(pieces))})
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
        type_vocab_size=2,
        pad_token_id=tokenizer.pad_token_id,
        id2label={0: "LABEL_0"},  # one logit
        initializer_range=0.2,
    )
    return save_model(BertForSequenceClassification, config, tokenizer, Path(path), seed)


def build_bert_cross_encoder_with_unembedded_word(path: str | Path, word: str = "zebra") -> Path:
    """build_bert_cross_encoder's model, whose tokenizer also knows `word` as a token the model's
    embedding table has no row for: a pair holding it makes the model raise IndexError (a model
    exception on demand); every other pair scores as build_bert_cross_encoder's model scores it."""
    path = build_bert_cross_encoder(path)
    tokenizer = BertTokenizer.from_pretrained(path)
    tokenizer.add_tokens([word])
    tokenizer.save_pretrained(path)
    return path


def build_xlmr_cross_encoder(path: str | Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """An XLMRobertaForSequenceClassification with one logit and a Unigram tokenizer laid out like
    bge-reranker's: `<s> A </s></s> B </s>`, pad id 1, positions offset past the padding index."""
    words = _word_counts(pre_tokenizers.Metaspace())  # "▁word" pieces, case kept
    counts: Counter[str] = Counter()
    for word, count in words.items():
        counts[word] += count
        for character in word:
            counts[character] += count
    counts.update({suffix: 1 for suffix in SUFFIXES})
    total = sum(counts.values())
    # Unigram scores are log probabilities: whole words beat their characters, unseen words split.
    scored = sorted(
        ((piece, math.log(count / total)) for piece, count in counts.items()),
        key=lambda item: (-item[1], item[0]),
    )
    vocab = [(special, 0.0) for special in XLMR_SPECIALS] + scored + [("<mask>", 0.0)]
    tokenizer = XLMRobertaTokenizer(vocab=vocab)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=514,
        type_vocab_size=1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        id2label={0: "LABEL_0"},  # one logit
        initializer_range=0.2,
    )
    return save_model(XLMRobertaForSequenceClassification, config, tokenizer, Path(path), seed)


def save_model(
    model_class: type[PreTrainedModel],
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    seed: int,
) -> Path:
    torch.manual_seed(seed)
    model = model_class(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
