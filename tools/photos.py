"""Gather real photos that installed packages ship, for calibration and evaluation.

Sources: scikit-image's data folder, scikit-learn's sample images, and (if unpacked) Debian's
opencv-doc example data. Nothing is downloaded. Files are split by a hash of their name into
disjoint ``calib/`` and ``eval/`` folders (about 80/20).

    python tools/photos.py out/photos [--opencv-doc /tmp/opencv-doc]
"""

from __future__ import annotations

import argparse
import shutil
import zlib
from pathlib import Path

from PIL import Image

MIN_SIDE = 128


def candidate_files(opencv_doc: Path | None) -> list[Path]:
    folders = []
    try:
        import skimage

        folders.append(Path(skimage.__file__).parent / "data")
    except ImportError:
        pass
    try:
        import sklearn

        folders.append(Path(sklearn.__file__).parent / "datasets" / "images")
    except ImportError:
        pass
    if opencv_doc is not None:
        folders.append(opencv_doc / "usr" / "share" / "doc" / "opencv-doc" / "examples" / "data")
    files = []
    for folder in folders:
        files += [p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")]
    return sorted(files)


def is_photo(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            return image.mode in ("RGB", "RGBA", "L") and min(image.size) >= MIN_SIDE
    except OSError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--opencv-doc", type=Path, default=None)
    args = parser.parse_args()
    counts = {"calib": 0, "eval": 0}
    for path in candidate_files(args.opencv_doc):
        if not is_photo(path):
            continue
        split = "eval" if zlib.crc32(path.name.encode()) % 5 == 0 else "calib"
        target = args.output / split / f"{path.parent.name}_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        counts[split] += 1
    print(counts)


if __name__ == "__main__":
    main()
