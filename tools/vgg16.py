"""Build VGG-16 (configuration D, 224x224, 1000 classes) with random He-initialised weights as ONNX.

No torch needed: the graph is written with onnx.helper. The weights are random, so the model is a
stand-in for timing and for the pipeline's cost at VGG-16 scale, not for accuracy.

    python tools/vgg16.py out/vgg16-random.onnx
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CONFIG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def build_vgg16(seed: int = 0, size: int = 224) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    x, c, block, index = "image", 3, 1, 1
    for item in CONFIG_D:
        if item == "M":
            nodes.append(helper.make_node("MaxPool", [x], [f"pool{block}"], kernel_shape=[2, 2], strides=[2, 2]))
            x, block, index = f"pool{block}", block + 1, 1
            continue
        name = f"conv{block}_{index}"
        weight = rng.standard_normal((item, c, 3, 3)) * np.sqrt(2.0 / (9 * c))
        nodes.append(helper.make_node("Conv", [x, const(f"{name}.weight", weight), const(f"{name}.bias", np.zeros(item))],
                                      [name], name=name, kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
        nodes.append(helper.make_node("Relu", [name], [f"{name}_relu"], name=f"{name}_relu"))
        x, c, index = f"{name}_relu", item, index + 1
    nodes.append(helper.make_node("Flatten", [x], ["flat"]))
    x, width = "flat", 512 * (size // 32) ** 2
    for layer, out in (("fc6", 4096), ("fc7", 4096), ("fc8", 1000)):
        weight = rng.standard_normal((out, width)) * np.sqrt(2.0 / width)
        nodes.append(helper.make_node("Gemm", [x, const(f"{layer}.weight", weight), const(f"{layer}.bias", np.zeros(out))],
                                      [layer], name=layer, transB=1))
        x, width = layer, out
        if layer != "fc8":
            nodes.append(helper.make_node("Relu", [layer], [f"{layer}_relu"]))
            x = f"{layer}_relu"
    graph = helper.make_graph(nodes, "vgg16-random",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.producer_name = "onnx-lowrank tools/vgg16.py"
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=224, help="input side (a multiple of 32)")
    args = parser.parse_args()
    onnx.save(build_vgg16(args.seed, args.size), args.output)


if __name__ == "__main__":
    main()
