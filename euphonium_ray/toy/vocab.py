"""The toy world's words: shapes, colours, directions, the caption grammar and its parser.

A caption is ``"a {colour} {shape} moving {direction}"`` ("a red square moving left"). The parser is the only way
the ORM and the data generator learn what a caption asks for, so an unknown word fails loudly, naming the word
and the words that are allowed.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from euphonium_ray.errors import EuphoniumError

# RGB in [-1, 1]. Every colour has at least one channel at +1, so on the black background the largest channel
# of a pixel measures how much of the shape covers it (the ORM relies on that).
COLOR_RGB: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
    "magenta": (1.0, -1.0, 1.0),
    "cyan": (-1.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
BACKGROUND_RGB: tuple[float, float, float] = (-1.0, -1.0, -1.0)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Unit vectors in image coordinates (x to the right, y downwards).
DIRECTION_XY: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
CAPTION_FORMAT = "a {color} {shape} moving {direction}"
FIXED_WORDS: tuple[str, ...] = ("a", "moving")


class CaptionError(EuphoniumError, ValueError):
    """A caption the toy world cannot read; the message names the offending word and the allowed ones."""


@dataclass(frozen=True)
class Attributes:
    """What a caption asks for."""

    color: str
    shape: str
    direction: str

    def caption(self) -> str:
        return CAPTION_FORMAT.format(color=self.color, shape=self.shape, direction=self.direction)


def _check_known(kind: str, word: str, allowed: tuple[str, ...] | list[str]) -> None:
    if word not in allowed:
        raise CaptionError(f"unknown {kind} word {word!r}; the toy world knows: {', '.join(allowed)}")


def check_world_words(shapes: list[str], colors: list[str], directions: list[str]) -> None:
    """Fail early when a config names a shape, colour or direction the renderer cannot draw."""
    for word in shapes:
        _check_known("shape", word, SHAPES)
    for word in colors:
        _check_known("colour", word, tuple(COLOR_RGB))
    for word in directions:
        _check_known("direction", word, tuple(DIRECTION_XY))


def parse_caption(
    caption: str,
    shapes: list[str] | tuple[str, ...] = SHAPES,
    colors: list[str] | tuple[str, ...] = tuple(COLOR_RGB),
    directions: list[str] | tuple[str, ...] = tuple(DIRECTION_XY),
) -> Attributes:
    """``"a red square moving left"`` → Attributes(red, square, left); an unknown word raises CaptionError."""
    words = caption.strip().lower().rstrip(".").split()
    if len(words) != 5 or words[0] not in ("a", "an") or words[3] != "moving":
        raise CaptionError(f"caption {caption!r} does not read 'a <colour> <shape> moving <direction>'")
    color, shape, direction = words[1], words[2], words[4]
    _check_known("colour", color, tuple(colors))
    _check_known("shape", shape, tuple(shapes))
    _check_known("direction", direction, tuple(directions))
    return Attributes(color=color, shape=shape, direction=direction)


def all_attributes(shapes: list[str], colors: list[str], directions: list[str]) -> list[Attributes]:
    """Every combination, in a fixed order (colour, shape, direction)."""
    check_world_words(shapes, colors, directions)
    return [Attributes(c, s, d) for c, s, d in itertools.product(colors, shapes, directions)]


def prompt_set(shapes: list[str], colors: list[str], directions: list[str], num_prompts: int, seed: int) -> list[str]:
    """The world's prompts: all combinations when ``num_prompts`` covers them, else a seeded subset (sorted by the
    combination order so the list reads naturally)."""
    combos = all_attributes(shapes, colors, directions)
    if num_prompts >= len(combos):
        return [a.caption() for a in combos]
    keep = sorted(random.Random(seed).sample(range(len(combos)), num_prompts))
    return [combos[i].caption() for i in keep]


def vocabulary(shapes: list[str], colors: list[str], directions: list[str]) -> list[str]:
    """The words a caption can contain (for the tokenizer)."""
    return [*FIXED_WORDS, "an", *colors, *shapes, *directions]
