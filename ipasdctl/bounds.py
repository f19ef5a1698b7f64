"""The size bounds a value from a recipe or a file someone handed in is checked against, each stated once, and
the one check that a value is a whole number within bounds.

A bound here is not a limit of the method: it keeps a hostile or mistyped value (an input of 100,000 pixels a
side, a billion classes) from allocating more than any machine holds before the check that names it.
"""

from __future__ import annotations

MAX_IMAGE_SIDE = 4096  # pixels a side: a batch of larger images would not fit any machine
MAX_CHANNELS = 4  # an image's channels (grey, RGB, RGBA)
MAX_CLASSES = 1_000_000  # classes of a checkpoint or an exported model


def whole(value, low: float, high: float) -> bool:
    """`value` is an int (not a bool, which Python counts as one) from `low` to `high`, both included."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
