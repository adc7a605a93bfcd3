"""English sentences from the Python documentation that the standard library ships (`pydoc_data.topics`).

Text models need real text to calibrate and evaluate on, and tests and benchmarks must not download any. The
help topics of `pydoc` are prose written by people: this module keeps the sentences of their paragraphs and
drops headings, grammar rules, code and tables. The order is the documentation's own, so it is deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from strata.core.errors import ConfigError
from strata.core.fsutil import write_bytes_atomic

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"'][.!?])\s+(?=[A-Z])")
_MARKUP = re.compile(r"[*`|]|\[\d+\]|::")
_ALLOWED = re.compile(r"^[A-Z][A-Za-z0-9 ,;:'\"()\-./%+=]*[.!?]$")


def _paragraphs(text: str) -> Iterable[str]:
    """Prose paragraphs: blocks of unindented lines, skipping headings (underlined) and indented code."""
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.strip() and not line.startswith((" ", "\t")) and not set(line.strip()) <= set("*=-~^"):
            block.append(line.strip())
            continue
        if block:
            yield " ".join(block)
        block = []


def clean_sentences(text: str, min_chars: int = 30, max_chars: int = 220) -> list[str]:
    """The plain English sentences of a reStructuredText-like help text, in order, without duplicates."""
    seen: set[str] = set()
    sentences: list[str] = []
    for paragraph in _paragraphs(text):
        if paragraph.startswith((">>>", "...")) or paragraph.endswith(":"):
            continue
        for raw in _SENTENCE_END.split(paragraph):
            sentence = " ".join(_MARKUP.sub("", raw).split())
            if not (min_chars <= len(sentence) <= max_chars) or not _ALLOWED.match(sentence):
                continue
            letters = sum(c.isalpha() or c == " " for c in sentence)
            if letters < 0.85 * len(sentence) or sentence in seen:
                continue
            seen.add(sentence)
            sentences.append(sentence)
    return sentences


def python_doc_sentences(limit: int | None = None) -> list[str]:
    """Sentences from the Python help topics that ship with this interpreter (`pydoc_data.topics`).

    Raises:
        ConfigError: this Python was built without `pydoc_data`, or it holds fewer sentences than `limit`.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise ConfigError("this Python has no pydoc_data; give calibration and evaluation text files") from exc
    sentences: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):
        for sentence in clean_sentences(topics[key]):
            if sentence not in seen:
                seen.add(sentence)
                sentences.append(sentence)
    if limit is not None:
        if len(sentences) < limit:
            raise ConfigError(f"pydoc_data holds {len(sentences)} clean sentences, fewer than the {limit} asked for")
        sentences = sentences[:limit]
    return sentences


def write_sentences(path: Path, sentences: Iterable[str]) -> Path:
    """Write one sentence a line (the text DATA format of `strata optimize`), atomically."""
    write_bytes_atomic(path, "".join(f"{s}\n" for s in sentences).encode())
    return path
