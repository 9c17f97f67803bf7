"""Rendered text lines for a text recognizer (PP-OCR's CRNN/SVTR heads), when no line dataset is at hand.

Each line is a few words in PIL's bundled scalable font, random size, ink and paper colours, a
little rotation and blur, then PP-OCR's preprocessing: resized to height 48 keeping the aspect,
padded right to 320, scaled to (x / 255 - 0.5) / 0.5, NCHW. Calibration and evaluation sets come
from different seeds and disjoint vocabularies (``--vocabulary a`` or ``b``), so no word of one is
in the other.

    python tools/text_lines.py /tmp/lines-calib.npz --count 300 --seed 1 --vocabulary a
    python tools/text_lines.py /tmp/lines-eval.npz --count 120 --seed 2 --vocabulary b
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

VOCABULARIES = {
    "a": ("OPEN", "exit", "Station", "CAFE", "No Parking", "2026", "Sale 50%", "Hotel", "STOP", "Main St",
          "Pharmacy", "low rank", "BUS 42", "Welcome", "Tickets", "North", "Fresh bread", "Gate B7", "invoice",
          "Total 18.40", "Platform 3", "entrance", "Museum", "closed", "delivery"),
    "b": ("Library", "south", "Bakery", "EXIT ONLY", "1984", "Price 7.99", "Market", "push", "Room 101", "taxi",
          "Garden", "reserved", "Airport", "Menu", "ferry", "Office", "Lot C12", "Bank", "west wing", "pull",
          "Receipt no 5521", "Cinema", "open late", "Level -2", "parcel"),
}
HEIGHT, WIDTH = 48, 320


def render_line(rng: np.random.Generator, words: tuple[str, ...]) -> Image.Image:
    text = " ".join(rng.choice(words, size=int(rng.integers(1, 4))))
    font = ImageFont.load_default(size=int(rng.integers(26, 40)))
    left, top, right, bottom = font.getbbox(text)
    paper = tuple(int(v) for v in rng.integers(150, 256, 3))
    ink = tuple(int(v) for v in rng.integers(0, 100, 3))
    image = Image.new("RGB", (right - left + 16, bottom - top + 12), paper)
    ImageDraw.Draw(image).text((8 - left, 6 - top), text, font=font, fill=ink)
    image = image.rotate(float(rng.uniform(-3, 3)), expand=True, fillcolor=paper)
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 0.8))))


def preprocess(image: Image.Image) -> np.ndarray:
    width = min(WIDTH, max(1, round(image.width * HEIGHT / image.height)))
    resized = np.asarray(image.resize((width, HEIGHT), Image.BILINEAR), np.float32)
    line = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    line[:, :width] = (resized / 255.0 - 0.5) / 0.5
    return line.transpose(2, 0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help=".npz to write (key 'x')")
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--vocabulary", choices=sorted(VOCABULARIES), default="a")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    lines = np.stack([preprocess(render_line(rng, VOCABULARIES[args.vocabulary])) for _ in range(args.count)])
    np.savez(args.out, x=lines)
    print(f"wrote {len(lines)} lines {lines.shape[1:]} to {args.out}")


if __name__ == "__main__":
    main()
