"""Train the embedded demo model: a VGG-style CNN on OpenCV's 5,000 handwritten digits.

The digits come from Debian's ``opencv-doc`` package (``digits.png``: 50 rows x 100 columns of
20x20 digits, 500 per class). Fetch it without root with::

    apt-get download opencv-doc && dpkg -x opencv-doc_*.deb /tmp/opencv-doc

then run (torch from the ``tools`` extra)::

    python tools/train_demo.py --digits /tmp/opencv-doc/usr/share/doc/opencv-doc/examples/data/digits.png

It writes ``models/digits-vgg.onnx`` (dynamic batch, input ``image`` of shape N x 1 x 32 x 32,
pixels scaled to [0, 1]), ``models/digits-calib.npz`` (500 unlabelled-use calibration images, with
labels) and ``models/digits-test.npz`` (1,000 held-out labelled images). Train, calibration and
test images are disjoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

SIZE = 32


def load_digits(path: Path) -> tuple[np.ndarray, np.ndarray]:
    sheet = np.asarray(Image.open(path).convert("L"))
    cells = [np.hsplit(row, 100) for row in np.vsplit(sheet, 50)]
    digits = np.array(cells).reshape(-1, 20, 20)
    labels = np.repeat(np.arange(10), 500)
    upscaled = np.stack(
        [np.asarray(Image.fromarray(d).resize((SIZE, SIZE), Image.BILINEAR)) for d in digits]
    )
    images = (upscaled.astype(np.float32) / 255.0)[:, None]
    return images, labels.astype(np.int64)


def vgg_block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]


class DigitsVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *vgg_block(1, 64), *vgg_block(64, 64), nn.MaxPool2d(2),
            *vgg_block(64, 128), *vgg_block(128, 128), nn.MaxPool2d(2),
            *vgg_block(128, 256), *vgg_block(256, 256),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def random_shift(batch: torch.Tensor, max_shift: int = 3) -> torch.Tensor:
    dy, dx = np.random.randint(-max_shift, max_shift + 1, size=2)
    return torch.roll(batch, shifts=(int(dy), int(dx)), dims=(2, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--digits", type=Path, required=True)
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "models")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    np.random.seed(0)
    images, labels = load_digits(args.digits)
    order = np.random.default_rng(0).permutation(len(images))
    train, calib, test = order[:3500], order[3500:4000], order[4000:]

    model = DigitsVGG()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=args.epochs * 55)
    x_train, y_train = torch.from_numpy(images[train]), torch.from_numpy(labels[train])
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(train))
        for start in range(0, len(train), 64):
            idx = perm[start:start + 64]
            loss = nn.functional.cross_entropy(model(random_shift(x_train[idx])), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(torch.from_numpy(images[test])).argmax(1).numpy() == labels[test]).mean()
        print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {accuracy:.4f}", flush=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model, torch.from_numpy(images[:1]), str(args.out_dir / "digits-vgg.onnx"),
        input_names=["image"], output_names=["logits"], opset_version=17,
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,
    )
    np.savez_compressed(args.out_dir / "digits-calib.npz", image=images[calib], labels=labels[calib])
    np.savez_compressed(args.out_dir / "digits-test.npz", image=images[test], labels=labels[test])


if __name__ == "__main__":
    main()
