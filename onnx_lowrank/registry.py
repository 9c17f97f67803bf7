"""The decomposition methods, each declared once: what it solves from, how it plans and builds its
chains, what it handles and what it supports. The pipeline branches on these properties, never on
a method's name, so a method that reuses a plan family and a solver is one entry here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Solver(Enum):
    """How a layer's chain is computed."""

    PCA = "pca"  # Eq. 4: principal subspace of the responses
    NONLINEAR = "nonlinear"  # Eq. 6-12: the alternating solver through the activation
    WEIGHT_SVD = "weight svd"  # truncated SVD of the weights (data-free)
    SPATIAL_FILTERS = "spatial filters"  # Jaderberg's k x 1 / 1 x k filter reconstruction (data-free)
    TUCKER2 = "tucker2"  # Tucker-2 of the kernel (data-free)

    @property
    def data_free(self) -> bool:
        return self in (Solver.WEIGHT_SVD, Solver.SPATIAL_FILTERS, Solver.TUCKER2)


class PlanFamily(Enum):
    """What a plan chooses per layer."""

    CHANNEL = "channel"  # a rank d' (Eq. 13-14)
    SPATIAL = "spatial"  # a rank of the k x 1 / 1 x k pair
    THREE_D = "3d"  # a channel rank and, where it pays, a spatial split (paper §3.5)
    TUCKER2 = "tucker2"  # an input and an output rank


@dataclass(frozen=True)
class Method:
    name: str
    solver: Solver
    plan: PlanFamily
    asymmetric: bool = False  # Eq. 12 by default (--symmetric solves from the original's inputs)
    splits_kernel: bool = False  # its chain splits a k x k kernel: 2-D convs with group=1 only
    selections: tuple[str, ...] = ("energy", "sensitivity", "uniform")
    latency: bool = True  # --objective latency can time its forms
    # The solver the budget search probes its plans with, symmetrically (each layer from the
    # original network's input, so a layer's chain is solved once for all plans): PCA (Eq. 4) is
    # nested and re-collects nothing; a 3d chain needs the solver to correct its spatial split.
    # None: the method is its own probe.
    probe_solver: Solver | None = None

    @property
    def data_free(self) -> bool:
        return self.solver.data_free

    @property
    def iterative(self) -> bool:
        """Whether its solver runs iterations (a quick run with fewer ranks plans more cheaply)."""
        return self.solver is Solver.NONLINEAR

    @property
    def default_selection(self) -> str:
        return "uniform" if self.data_free else "energy"


_BASELINE = {"selections": ("energy", "uniform"), "latency": False}
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("asymmetric", Solver.NONLINEAR, PlanFamily.CHANNEL, asymmetric=True, probe_solver=Solver.PCA),
    Method("asym3d", Solver.NONLINEAR, PlanFamily.THREE_D, asymmetric=True, probe_solver=Solver.NONLINEAR),
    Method("nonlinear", Solver.NONLINEAR, PlanFamily.CHANNEL, probe_solver=Solver.PCA),
    Method("linear", Solver.PCA, PlanFamily.CHANNEL),
    Method("jaderberg", Solver.SPATIAL_FILTERS, PlanFamily.SPATIAL, splits_kernel=True, **_BASELINE),
    Method("svd", Solver.WEIGHT_SVD, PlanFamily.CHANNEL, **_BASELINE),
    Method("tucker2", Solver.TUCKER2, PlanFamily.TUCKER2, splits_kernel=True, selections=("uniform",),
           latency=False),
)}
