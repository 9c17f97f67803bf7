"""How many spatial positions to sample per image for each layer's responses.

The regression methods fit d x d' parameters per layer, so what matters is samples per output
channel: a fixed count per image starves wide layers (a 512-channel layer got 16 samples per
channel from 256 images at 32 positions) while narrow ones get plenty. Each layer gets at least
``per_channel * d`` samples when its feature maps have that many positions, and never fewer per
image than the old fixed default, within a bound on the memory all the samples take.
Pure arithmetic: no ONNX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SAMPLES_PER_CHANNEL = 40  # the paper: 3,000 images x 10 positions for d <= 512, i.e. >= 58 per channel
FEWEST_PER_CHANNEL = 20  # below it the nonlinear and asymmetric fits overfit the calibration set (CRAFT)
BASE_POSITIONS = 32
BYTES_PER_VALUE = 4


@dataclass(frozen=True)
class ResponseShape:
    """One layer's response per image: ``channels`` x ``positions`` (its output's H x W)."""

    channels: int
    positions: int


def positions_per_image(layers: dict[str, ResponseShape], images: int, memory_bytes: int,
                        per_channel: int = SAMPLES_PER_CHANNEL) -> dict[str, int]:
    """Positions to sample per image for each layer: ``max(32, ceil(per_channel * d / images))``,
    capped at the layer's positions, then scaled down together (never below one) until the
    float32 samples of all layers fit in ``memory_bytes``."""
    if images < 1 or memory_bytes < 1:
        raise ValueError(f"need images >= 1 and memory_bytes >= 1, got {images} and {memory_bytes}")
    wanted = {name: min(shape.positions, max(BASE_POSITIONS, math.ceil(per_channel * shape.channels / images)))
              for name, shape in layers.items()}
    total = sum(images * wanted[name] * shape.channels * BYTES_PER_VALUE for name, shape in layers.items())
    if total <= memory_bytes:
        return wanted
    scale = memory_bytes / total
    return {name: max(1, math.floor(count * scale)) for name, count in wanted.items()}


def images_per_batch(bytes_per_image: int, preferred: int, budget: int) -> int:
    """At most ``preferred`` images, and no more than ``budget`` bytes of ``bytes_per_image`` hold:
    onnxruntime computes a collection's outputs at full resolution before they are sampled, and
    the larger batch bought no time (CRAFT, batch 8 against 1: 0.9 GiB more, 4 % slower)."""
    return max(1, min(preferred, budget // max(bytes_per_image, 1)))
