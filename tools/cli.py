"""Argument types shared by the tools' argparse shells."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer >= 1."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def answer_tokens(*words: str):
    """A type for "the first k answer tokens": a positive integer, 'all' (None) or one of `words`
    (kept as the word, e.g. 'auto' or 'run', for the tool to resolve)."""
    def parse(text: str) -> int | str | None:
        if text == "all":
            return None
        if text in words:
            return text
        try:
            return positive_int(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None

    return parse


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}")
    return value
