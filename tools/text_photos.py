"""Photos with words drawn on them, for calibrating and evaluating a text detector (CRAFT) when
no text dataset is at hand (CRAFT itself was trained on such synthetic text, SynthText).

Each photo gets a few random words in the bundled scalable font (random size, colour against
the local background, position), resized to the detector's input. Calibration and evaluation
sets come from disjoint photo folders and different seeds.

    python tools/text_photos.py /tmp/photos/calib /tmp/text-calib --size 256x320 --seed 1
    python tools/text_photos.py /tmp/photos/eval /tmp/text-eval --size 256x320 --seed 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS = ("OPEN", "exit", "Station", "CAFE", "No Parking", "2026", "Sale 50%", "Hotel", "STOP", "Main St",
         "Pharmacy", "low rank", "BUS 42", "Welcome", "Tickets", "North", "Fresh bread", "Gate B7")


def draw_words(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    for _ in range(rng.integers(2, 6)):
        font = ImageFont.load_default(size=int(rng.integers(height // 18, height // 6)))
        word = WORDS[rng.integers(len(WORDS))]
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
        x = int(rng.integers(0, max(1, width - (right - left))))
        y = int(rng.integers(0, max(1, height - (bottom - top))))
        patch = np.asarray(canvas.crop((x, y, x + right - left, y + bottom - top)).convert("L"), np.float32)
        shade = 20 if patch.size and patch.mean() > 128 else 235
        colour = tuple(int(np.clip(shade + v, 0, 255)) for v in rng.integers(-20, 21, 3))
        draw.text((x, y), word, font=font, fill=colour)
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--size", default="256x320", help="HxW")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))
    rng = np.random.default_rng(args.seed)
    args.output.mkdir(parents=True, exist_ok=True)
    files = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for path in files:
        image = Image.open(path).convert("RGB").resize((width, height))
        draw_words(image, rng).save(args.output / f"{path.stem}.png")
    print(f"wrote {len(files)} images to {args.output}")


if __name__ == "__main__":
    main()
