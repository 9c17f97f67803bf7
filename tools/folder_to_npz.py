"""Preprocess an image folder once into an .npz test set, as the tool would read it for a model,
so the benchmark scripts can measure on it (``tools/bench_budget.py --test``).

    python tools/folder_to_npz.py /tmp/yolov8n.onnx /tmp/photos/eval /tmp/yolo-test.npz \\
        --preprocess raw --input-size 320x320
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx

from onnx_lowrank.runtime.calibration import model_inputs, open_calibration
from onnx_lowrank.runtime.images import make_preprocess


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("folder")
    parser.add_argument("out")
    parser.add_argument("--preprocess", default="imagenet")
    parser.add_argument("--scale", type=float)
    parser.add_argument("--mean", help="comma-separated")
    parser.add_argument("--std", help="comma-separated")
    parser.add_argument("--input-size", help="HxW for models with a dynamic size")
    args = parser.parse_args()

    def floats(text):
        return tuple(float(v) for v in text.split(",")) if text else None

    inputs = model_inputs(onnx.load(args.model, load_external_data=False))
    size = tuple(int(v) for v in args.input_size.split("x")) if args.input_size else None
    source = open_calibration(args.folder, inputs, input_size=size, role="test",
                              preprocess=make_preprocess(args.preprocess, floats(args.mean), floats(args.std),
                                                         args.scale))
    arrays = source.get(list(range(len(source))))
    np.savez(args.out, **arrays)
    print({name: array.shape for name, array in arrays.items()})


if __name__ == "__main__":
    main()
