"""Make N calibration inputs from a few photos: random crops (30-100 % of the area) and flips,
resized to SIZE, ImageNet-normalised, saved as one NCHW float32 .npy. Used to time the pipeline
with more calibration images than the photo set has.

    python tools/calib_crops.py /tmp/photos/calib /tmp/crops500.npy --count 500 --size 224
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    files = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    out = np.lib.format.open_memmap(args.output, mode="w+", dtype=np.float32,
                                    shape=(args.count, 3, args.size, args.size))
    for index in range(args.count):
        image = Image.open(files[index % len(files)]).convert("RGB")
        width, height = image.size
        side = np.sqrt(rng.uniform(0.3, 1.0)) * min(width, height)
        left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
        crop = image.crop((int(left), int(top), int(left + side), int(top + side))).resize((args.size, args.size))
        pixels = np.asarray(crop, np.float32) / 255.0
        if rng.random() < 0.5:
            pixels = pixels[:, ::-1]
        out[index] = ((pixels - MEAN) / STD).transpose(2, 0, 1)
    out.flush()
    print(f"wrote {args.count} inputs to {args.output}")


if __name__ == "__main__":
    main()
