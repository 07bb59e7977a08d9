"""How degenerate one response is: loops, repeated phrases, text that compresses like a loop.

`degeneracy(text)` is a score in [0, 1] (0: fluent, 1: fully degenerate), the largest of three signals,
each in [0, 1]:

    repetition   share of the token 4-grams that repeat an earlier one
    compression  how far zlib compresses the text below fluent prose's ratio
    loop         share of the text covered by its longest suffix made of one unit repeated >= 3 times

A response counts as degenerate when its score is at least DEGENERATE_AT (0.2). Tokens are words (runs of
letters, digits and underscores) and single punctuation marks, lower-cased. Texts of fewer than MIN_TOKENS
tokens score 0 on every signal (too short to tell a loop from a short answer), and the compression signal
needs MIN_COMPRESSED_CHARS characters (zlib's fixed overhead dominates below).

What it does not catch: word salad without repetition (random words compress and vary like prose), a
fluent answer that is wrong, off-topic or in another language, a loop shorter than three repeats or of
fewer than MIN_TOKENS tokens, and a loop that ended before the response did (only the repetition signal
sees that one, by its share of repeated 4-grams). Code and lists legitimately repeat tokens; their
4-grams rarely repeat, and the tests keep a Python function and a numbered list below the threshold. A run
of one punctuation character is a loop of that character (as "!!!!!!!!" from a broken model is), so long
decorative rules and box-drawing tables raise the score too. Compression alone cannot tell a short loop from
dense prose (both reach 0.3), so its signal only fires on long loops; the other two catch the short ones.
"""

from __future__ import annotations

import re
import zlib

NGRAM = 4  # the n of the repeated n-grams
MIN_TOKENS = 12  # shorter texts score 0
MIN_COMPRESSED_CHARS = 120  # the compression signal's shortest text
# Compression ratios: 0.3 is the lowest measured on 0.5-8 kB pieces of fluent prose, Markdown and Python source
# (this repository's README and modules); a sentence repeated five times compresses to 0.21, twenty times to 0.06.
FLUENT_RATIO = 0.3  # at or above it the compression signal is 0
LOOP_RATIO = 0.1  # at or below it the signal is 1
MIN_REPEATS = 3  # a loop's unit repeats at least this many times
# A response with degeneracy at least this counts as degenerate: the best F1 against the degenerate marks given by
# reading on the development half of bench/judge-labels (bench/degeneracy.py); on the test half F1 0.87 and
# kappa 0.85, where 0.5 found fewer than a third of the loops (F1 0.37).
DEGENERATE_AT = 0.2

TOKEN = re.compile(r"\w+|[^\w\s]")


def tokens(text: str) -> list[str]:
    """The lower-cased words and punctuation marks of `text`."""
    return TOKEN.findall(text.lower())


def repeated_ngram_share(words: list[str], n: int = NGRAM) -> float:
    """Share of the n-grams g_i = (w_i, ..., w_{i+n-1}) that equal an earlier one:

        r = |{i : g_i = g_j for some j < i}| / (N - n + 1)

    0 for fewer than MIN_TOKENS tokens. A text repeated k times has r ≈ (k - 1) / k."""
    if len(words) < max(MIN_TOKENS, n):
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        repeats += gram in seen
        seen.add(gram)
    return repeats / (len(words) - n + 1)


def compression_ratio(text: str) -> float:
    """zlib-compressed size / raw size of the UTF-8 bytes (level 9): c = |zlib(t)| / |t|."""
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / len(raw) if raw else 1.0


def compression_signal(text: str) -> float:
    """How far the compression ratio c falls below fluent prose's, mapped linearly to [0, 1]:

        s = clamp((FLUENT_RATIO - c) / (FLUENT_RATIO - LOOP_RATIO), 0, 1)

    0 for texts of fewer than MIN_COMPRESSED_CHARS characters or MIN_TOKENS tokens."""
    if len(text) < MIN_COMPRESSED_CHARS or len(tokens(text)) < MIN_TOKENS:
        return 0.0
    scaled = (FLUENT_RATIO - compression_ratio(text)) / (FLUENT_RATIO - LOOP_RATIO)
    return min(max(scaled, 0.0), 1.0)


def periodic_suffix(words: list[str], period: int) -> int:
    """Length of the longest suffix of `words` with period p: the largest L with w_i = w_{i-p} for every
    i in the last L - p positions (L = p when none match; a cut-off last unit still counts)."""
    end = len(words) - 1
    run = 0
    while end - run - period >= 0 and words[end - run] == words[end - run - period]:
        run += 1
    return run + period


def loop_share(words: list[str]) -> float:
    """Share of the tokens covered by the longest suffix made of one unit repeated at least MIN_REPEATS times:

        l = max_p { L_p / N : L_p >= MIN_REPEATS · p },   L_p = periodic_suffix(words, p)

    taken also without the last token (a response cut at the token limit may end inside a word: the suffix
    then ends one token early); 0 when no such suffix exists or for fewer than MIN_TOKENS tokens."""
    if len(words) < MIN_TOKENS:
        return 0.0
    best = 0
    for body in (words, words[:-1]):
        for period in range(1, len(body) // MIN_REPEATS + 1):
            length = periodic_suffix(body, period)
            if length >= MIN_REPEATS * period:
                best = max(best, length)
    return best / len(words)


def degeneracy(text: str) -> float:
    """The response's degeneracy in [0, 1]: the largest of its signals,

        d = max(repeated_ngram_share, compression_signal, loop_share)

    so that any one sign of a loop is enough; 0 for empty or short text."""
    words = tokens(text)
    return max(repeated_ngram_share(words), compression_signal(text), loop_share(words))


def is_degenerate(text: str, threshold: float = DEGENERATE_AT) -> bool:
    """Whether the response's degeneracy reaches `threshold`."""
    return degeneracy(text) >= threshold


def degenerate_share(texts: list[str], threshold: float = DEGENERATE_AT) -> float:
    """Share of `texts` that are degenerate (0 for none)."""
    return sum(is_degenerate(text, threshold) for text in texts) / len(texts) if texts else 0.0
