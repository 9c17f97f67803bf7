"""Image folders as calibration data: decoding with its checks, the preprocessing presets, resizing
to the model's input, and the augmented views of each picture."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from onnx_lowrank.errors import CalibrationError, InvalidOptionError

if TYPE_CHECKING:  # the specs are made in calibration, which opens image folders through this module
    from onnx_lowrank.runtime.calibration import InputSpec


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True)
class Preprocess:
    """``pixel * scale``, then ``(x - mean) / std`` per channel; ``bgr`` swaps the channel order first."""

    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    bgr: bool = False


PRESETS = {
    "imagenet": Preprocess(1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "tf": Preprocess(1 / 127.5, (1.0,), (1.0,)),
    "caffe": Preprocess(1.0, (103.939, 116.779, 123.68), (1.0,), bgr=True),
    "raw": Preprocess(1 / 255),
}


def make_preprocess(preset: str = "imagenet", mean: Sequence[float] | None = None,
                    std: Sequence[float] | None = None, scale: float | None = None,
                    bgr: bool | None = None) -> Preprocess:
    if preset not in PRESETS:
        raise InvalidOptionError(f"unknown preprocessing preset {preset!r}",
                                 hint=f"choose one of {', '.join(PRESETS)}")
    base = PRESETS[preset]
    result = Preprocess(
        scale=base.scale if scale is None else float(scale),
        mean=base.mean if mean is None else tuple(float(m) for m in mean),
        std=base.std if std is None else tuple(float(s) for s in std),
        bgr=base.bgr if bgr is None else bool(bgr),
    )
    if any(s == 0 for s in result.std):
        raise InvalidOptionError(f"--std must not contain 0, got {result.std}")
    return result


class ImageFolderSource:
    """Images found recursively in a folder, resized, centre-cropped and normalised on demand.
    Files that are not readable images (or are too large to decode safely) are left out with a warning."""

    def __init__(self, folder: Path, spec: InputSpec, preprocess: Preprocess,
                 input_size: tuple[int, int] | None) -> None:
        self.description = f"image folder {folder}"
        if spec.layout is None:
            raise CalibrationError(f"input {spec.name!r} of shape {spec.shape} is not an image input",
                                   hint="pass --calib as .npy/.npz or a reader script instead")
        candidates = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not candidates:
            raise CalibrationError(f"no images (jpg/png/bmp/webp) found in {folder}")
        self.files, unreadable = [], []
        for path in candidates:
            problem = _image_problem(path)
            (unreadable.append(f"{path.name} ({problem})") if problem else self.files.append(path))
        self.warnings = []
        if unreadable:
            self.warnings.append(f"{len(unreadable)} file(s) in {folder} are not usable images and were left out, "
                                 f"e.g. {unreadable[0]}")
        if not self.files:
            raise CalibrationError(f"no readable images in {folder}: {unreadable[0]}")
        self.spec = spec
        self.preprocess = preprocess
        self.labels = None
        self.channels = spec.shape[spec.channel_axis]
        self.size = _spatial_size(spec, input_size)

    def __len__(self) -> int:
        return len(self.files)

    def get(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        batch = np.stack([self._load(self.files[i]) for i in indices])
        if self.spec.layout == "NCHW":
            batch = batch.transpose(0, 3, 1, 2)
        return {self.spec.name: np.ascontiguousarray(batch.astype(self.spec.dtype))}

    def view(self, index: int, rng: np.random.Generator | None, mirror: bool) -> np.ndarray:
        """One file as an augmented view: mirrored, and/or a crop of 80-100 % of each side at a
        random place (``rng``), before the usual resize and centre crop; layout as ``get``."""
        pixels = self._load(self.files[index], rng, mirror)
        return pixels.transpose(2, 0, 1) if self.spec.layout == "NCHW" else pixels

    def _load(self, path: Path, rng: np.random.Generator | None = None, mirror: bool = False) -> np.ndarray:
        from PIL import Image, ImageOps

        try:
            with Image.open(path) as opened:
                image = opened.convert("L" if self.channels == 1 else "RGB")
        except unreadable_image_errors() as exc:
            raise CalibrationError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None
        if mirror:
            image = ImageOps.mirror(image)
        if rng is not None:
            width, height = (max(1, round(side * rng.uniform(0.8, 1.0))) for side in image.size)
            left, top = int(rng.integers(0, image.width - width + 1)), int(rng.integers(0, image.height - height + 1))
            image = image.crop((left, top, left + width, top + height))
        height, width = self.size
        factor = max(height / image.height, width / image.width)
        resized = image.resize((max(width, round(image.width * factor)), max(height, round(image.height * factor))),
                               Image.BILINEAR)
        top, left = (resized.height - height) // 2, (resized.width - width) // 2
        pixels = np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.float32)
        pixels = pixels.reshape(height, width, -1)
        if self.preprocess.bgr:
            pixels = pixels[..., ::-1]
        mean = _per_channel(self.preprocess.mean, pixels.shape[-1])
        std = _per_channel(self.preprocess.std, pixels.shape[-1])
        return (pixels * self.preprocess.scale - mean) / std


class AugmentedViews:
    """``views`` views of each calibration picture (the picture, its mirror image, and random crops
    of 80-100 % of each side, mirrored every other one), made on demand. View ``v`` is view
    ``v % views`` of picture ``pictures[v // views]``: the views of a picture are all on the
    calibration side, never in the held-out part."""

    def __init__(self, source: ImageFolderSource, pictures: Sequence[int], views: int, seed: int) -> None:
        self.source, self.pictures, self.views, self.seed = source, list(pictures), views, seed
        self.description = f"{source.description}, {views} views per picture"
        self.labels = None

    def __len__(self) -> int:
        return len(self.pictures) * self.views

    def get(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        batch = []
        for index in indices:
            picture, view = self.pictures[index // self.views], index % self.views
            rng = np.random.default_rng([self.seed, picture, view]) if view >= 2 else None
            batch.append(self.source.view(picture, rng, mirror=view % 2 == 1))
        return {self.source.spec.name: np.ascontiguousarray(np.stack(batch).astype(self.source.spec.dtype))}


def unreadable_image_errors() -> tuple[type[BaseException], ...]:
    """What Pillow raises for a file it cannot decode (truncated, corrupt, not an image, too large)."""
    from PIL import Image

    return OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError


def _image_problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image (read from its header only), or None."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.width < 1 or image.height < 1:
                return "empty image"
            limit = Image.MAX_IMAGE_PIXELS
            if limit and image.width * image.height > limit:
                return f"{image.width}x{image.height} pixels, over Pillow's decompression-bomb limit"
    except unreadable_image_errors() as exc:
        return type(exc).__name__
    return None


def _spatial_size(spec: InputSpec, input_size: tuple[int, int] | None) -> tuple[int, int]:
    """The H x W to feed an image input: the model's own, or ``input_size`` where the model's is dynamic."""
    fixed = tuple(spec.shape[axis] for axis in spec.spatial_axes)
    if input_size is not None:
        if all(d is not None for d in fixed) and tuple(input_size) != fixed:
            raise CalibrationError(f"input {spec.name!r} has the fixed size {fixed[0]}x{fixed[1]}; --input-size "
                                   f"{input_size[0]}x{input_size[1]} does not fit it",
                                   hint="drop --input-size: it is for models with a dynamic input size")
        return int(input_size[0]), int(input_size[1])
    if any(d is None for d in fixed):
        raise CalibrationError(f"input {spec.name!r} has dynamic spatial size {spec.shape}",
                               hint="give the size to calibrate at with --input-size HxW")
    return int(fixed[0]), int(fixed[1])


def _per_channel(values: tuple[float, ...], channels: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float32)
    if array.size == channels or array.size == 1:
        return array
    if channels == 1:
        return array.mean(keepdims=True)
    raise InvalidOptionError(f"--mean/--std need 1 or {channels} values, got {len(values)}")
