"""Aspect-ratio buckets: photos of every shape trained at about the same area, none cropped
square.

The buckets are sizes of about ``resolution`` x ``resolution`` pixels in 64-pixel steps, each
side between a minimum and a maximum and the long side at most ``max_ratio`` times the short
one (kohya's, OneTrainer's and SimpleTuner's scheme).  Each image goes to the bucket whose
aspect ratio is nearest its own, is resized to cover it, and loses only what sticks out
(centred, or at a random place, as ``centerCrop`` says).  Every batch is drawn from one bucket,
so a batch is one tensor; successive batches may differ in shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STEP = 64


@dataclass(frozen=True, order=True)
class Bucket:
    height: int
    width: int

    @property
    def ratio(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def square(resolution: int) -> Bucket:
    return Bucket(resolution, resolution)


def bucket_sizes(resolution: int, *, min_side: int, max_side: int, max_ratio: float) -> list[Bucket]:
    """Every bucket of about ``resolution``² pixels within the limits, from the tallest to the
    widest; the square is always one of them."""
    area = resolution * resolution
    found = {square(resolution)}
    for width in range(_round_down(min_side), max_side + 1, STEP):
        height = area // width // STEP * STEP
        if height < min_side or height > max_side:
            continue
        bucket = Bucket(height, width)
        if max(bucket.ratio, 1 / bucket.ratio) <= max_ratio + 1e-9:
            # Portrait and landscape alike.
            found |= {bucket, Bucket(width, height)}
    return sorted(found, key=lambda b: b.ratio)


def nearest(buckets: list[Bucket], *, height: int, width: int) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (in log scale: 2:1 and 1:2 are as
    far from 1:1)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.ratio) - ratio), -b.width * b.height))


def cover(height: int, width: int, bucket: Bucket) -> tuple[int, int]:
    """The size (height, width) the image is resized to: the smallest that covers the bucket."""
    scale = max(bucket.height / height, bucket.width / width)
    return max(bucket.height, round(height * scale)), max(bucket.width, round(width * scale))


def limits(resolution: int, *, min_side: int | None, max_side: int | None) -> tuple[int, int]:
    """The sides a bucket may have: unset, half and twice the resolution (in 64-pixel steps)."""
    low = min_side if min_side is not None else max(STEP, _round_down(resolution // 2))
    high = max_side if max_side is not None else _round_down(resolution * 2)
    return low, max(high, resolution)


def _round_down(value: int) -> int:
    return max(STEP, value // STEP * STEP)
