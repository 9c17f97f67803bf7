"""The run's data, split: calibration samples and held-out samples, disjoint by source."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DataSplit:
    """Calibration and evaluation sources, the disjoint index sets used from them, the batch size."""

    source: object
    eval_source: object
    calib_indices: list[int]
    holdout_indices: list[int]
    batch: int

    def held_out_labels(self) -> np.ndarray | None:
        """The class labels of the held-out samples, where the evaluation data has labels."""
        labels = getattr(self.eval_source, "labels", None)
        return None if labels is None else labels[list(self.holdout_indices)]
