"""Cost model of convolutions and of their factorisations, in multiply-accumulates (MACs).

Pure arithmetic, no ONNX: the graph side hands over shapes. Every layer kind is a ConvShape: a
1-D conv as a k x 1 one, a 3-D conv as ``(kh kw, kt)`` over ``(H W, T)`` positions (so the
spatial scheme is its (1 x kh x kw) -> (kt x 1 x 1) split, the first part on every input frame),
a dense layer
``x W`` as a 1 x 1 conv whose positions are the rows it is applied to (``T`` for ``[B, T, K]``),
a ConvTranspose with ``transposed`` set (it does its ``kh kw c d`` MACs per *input* position). One MAC is one multiply plus one
add; ``FLOPs = 2 * MACs`` is what the report prints.

A factorisation *scheme* turns one conv into a chain whose cost is linear in one rank ``r``:

* ``channel``: (kh x kw, c -> r) then (1 x 1, r -> d), both at the output resolution (paper Fig. 1);
* ``spatial``: (kh x 1, c -> r, stride (sh, 1)) then (1 x kw, r -> d, stride (1, sw)) (Jaderberg et
  al. 2014, scheme 2). The vertical conv runs on every input column: its output is
  ``H_out x W_in`` (horizontal padding moves to the second conv).
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMES = ("channel", "spatial")


@dataclass(frozen=True)
class ConvShape:
    """What the cost of a 2-D convolution depends on. ``in_hw`` is the input's spatial size
    (None: the same as the output's, as for a stride-1 'same' conv)."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    out_hw: tuple[int, int]
    group: int = 1
    in_hw: tuple[int, int] | None = None
    transposed: bool = False

    @property
    def positions(self) -> int:
        return self.out_hw[0] * self.out_hw[1]

    @property
    def kernel_positions(self) -> int:
        """Where the k x k kernel is applied: every output position, or every input one when transposed."""
        if not self.transposed:
            return self.positions
        in_hw = self.in_hw or self.out_hw
        return in_hw[0] * in_hw[1]

    @property
    def macs(self) -> int:
        kh, kw = self.kernel
        return self.kernel_positions * self.out_channels * (self.in_channels // self.group) * kh * kw

    @property
    def vertical_positions(self) -> int:
        """Output positions of the (kh x 1) conv of a spatial split: output rows x input columns."""
        return self.out_hw[0] * (self.in_hw or self.out_hw)[1]

    def with_out_channels(self, out_channels: int) -> "ConvShape":
        return ConvShape(self.in_channels, out_channels, self.kernel, self.out_hw, self.group, self.in_hw,
                         self.transposed)


def macs_per_rank(shape: ConvShape, scheme: str = "channel") -> int:
    """What one unit of rank costs in the factorised chain (its cost is ``rank * macs_per_rank``)."""
    kh, kw = shape.kernel
    c, d = shape.in_channels, shape.out_channels
    if scheme == "channel":  # grouped: both convs of the chain keep the groups (solvers.grouped)
        return (shape.kernel_positions * kh * kw * c + shape.positions * d) // shape.group
    if scheme == "spatial":
        return shape.vertical_positions * kh * c + shape.positions * kw * d
    raise ValueError(f"unknown factorisation scheme {scheme!r}")


def decomposed_macs(shape: ConvShape, rank: int, scheme: str = "channel") -> int:
    """Exact MACs of the factorised chain at ``rank``."""
    return rank * macs_per_rank(shape, scheme)


def max_rank(shape: ConvShape, scheme: str = "channel") -> int:
    """The rank at which the factorisation is exact: ``d`` for channel, ``min(c kh, d kw)`` for spatial."""
    kh, kw = shape.kernel
    if scheme == "spatial":
        return min(shape.in_channels * kh, shape.out_channels * kw)
    return shape.out_channels


def break_even_rank(shape: ConvShape, scheme: str = "channel") -> int:
    """Smallest rank at which the factorisation stops being cheaper than the original conv.

    Only ranks strictly below it save work, so a layer whose break-even rank is 1 can never
    pay off (e.g. a 3-channel input layer, or a small 1x1 conv).
    """
    return -(-shape.macs // macs_per_rank(shape, scheme))


def tucker2_macs(shape: ConvShape, in_rank: int, out_rank: int) -> int:
    """Exact MACs of (1 x 1, c -> r1) at the input resolution, (kh x kw, r1 -> r2), (1 x 1, r2 -> d)."""
    kh, kw = shape.kernel
    in_positions = (shape.in_hw or shape.out_hw)[0] * (shape.in_hw or shape.out_hw)[1]
    return (in_positions * shape.in_channels * in_rank
            + shape.positions * (kh * kw * in_rank * out_rank + out_rank * shape.out_channels))
