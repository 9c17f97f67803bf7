"""Cost model of convolutions in multiply-accumulates (MACs).

Pure arithmetic, no ONNX: the graph side hands over shapes. One MAC is one multiply plus one
add; ``FLOPs = 2 * MACs`` is what the report prints.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConvShape:
    """What the cost of a 2-D convolution depends on."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    out_hw: tuple[int, int]
    group: int = 1

    @property
    def positions(self) -> int:
        return self.out_hw[0] * self.out_hw[1]

    @property
    def macs(self) -> int:
        kh, kw = self.kernel
        return self.positions * self.out_channels * (self.in_channels // self.group) * kh * kw


def channel_decomposed_macs(shape: ConvShape, rank: int) -> int:
    """Exact MACs of (k x k, c -> rank) followed by (1 x 1, rank -> d), both at the output resolution."""
    kh, kw = shape.kernel
    per_position = rank * shape.in_channels * kh * kw + shape.out_channels * rank
    return shape.positions * per_position


def break_even_rank(shape: ConvShape) -> int:
    """Smallest rank at which the channel decomposition stops being cheaper than the original.

    Only ranks strictly below it save work, so a layer whose break-even rank is 1 can never
    pay off (e.g. a 3-channel input layer, or a small 1x1 conv).
    """
    kh, kw = shape.kernel
    k2c = kh * kw * shape.in_channels
    d = shape.out_channels
    # rank * (k2c + d) < d * k2c
    return -(-d * k2c // (k2c + d))
