"""Label maps drawn as pictures: class colours, overlays, titled panels and legends.

Pillow only (no matplotlib). Every function returns an RGB ``PIL.Image``; save it with
``img.save("x.png")``, or with :func:`save_image`, which writes atomically (what the CLI does).

* :func:`colorize` / :func:`overlay` — a label map in class colours, alone or blended over the image.
* :func:`side_by_side` — titled panels on white, e.g. image | prediction | ground truth.
* :func:`legend` — colour swatches with class names.

A ``palette`` is anything shaped like ``[K, 3]`` (list of RGB tuples, flat list of 3K ints, numpy
array, tensor); ``None`` means :func:`transeg.data.palettes.default_palette`, the PASCAL VOC colour
map, which has a distinct colour per id.

The font and text-measuring helpers and the palette parsing here are shared with
:mod:`transeg.charts`, which imports them from this module.
"""
from __future__ import annotations

import functools
import math
from numbers import Real

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from transeg.data.palettes import default_palette
from transeg.errors import TransegError

__all__ = ["colorize", "overlay", "side_by_side", "legend", "save_image"]

WHITE = (255, 255, 255)
TEXT = (34, 34, 34)
MUTED = (120, 120, 120)


# ------------------------------------------------------------------------------------ saving
def image_format(path) -> str:
    """Pillow's format name for ``path``'s extension ("PNG" for x.png), or one line saying which to use."""
    from pathlib import Path

    suffix = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise TransegError(f"{path}: cannot write images of type {suffix or '(no extension)'!r}; use .png or .jpg")
    return fmt


def save_image(image: Image.Image, path, **params):
    """Write ``image`` to ``path`` atomically (a temporary in the same folder, then a rename, with
    :func:`transeg.checkpoint.atomic_write`): a full disk or a read-only folder is one TransegError line
    naming the file, and neither a half-written image nor a temporary is left; an existing file is
    replaced only by a complete one. ``params`` go to ``Image.save`` (e.g. quality=92). Returns the path."""
    from transeg.checkpoint import atomic_write
    from transeg.data.folder import plain_permissions

    fmt = image_format(path)

    def write(tmp):
        image.save(tmp, format=fmt, **params)
        plain_permissions(tmp)

    atomic_write(path, write)
    return path


# ------------------------------------------------------------------------------------ helpers
@functools.lru_cache(maxsize=32)
def _font(size: int):
    """Pillow's bundled font at ``size`` px (Pillow >= 10.1 with FreeType), else the bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError, ImportError):
        return ImageFont.load_default()


def _text_w(font, text: str) -> int:
    if not text:
        return 0
    l, _, r, _ = font.getbbox(text)
    return r - l


def _line_h(font) -> int:
    _, t, _, b = font.getbbox("Ag|")
    return b + max(t, 0)


def _fit(font, text: str, width: int) -> str:
    """``text`` shortened with an ellipsis so it fits in ``width`` pixels."""
    if _text_w(font, text) <= width:
        return text
    while text and _text_w(font, text + "...") > width:
        text = text[:-1]
    return text + "..." if text else ""


def _palette(palette, need: int | None = None, where: str = "palette") -> np.ndarray:
    if palette is None:
        return np.asarray(default_palette(max(256, need or 0)), dtype=np.uint8)
    if hasattr(palette, "detach"):
        palette = palette.detach().cpu().numpy()
    try:
        arr = np.asarray(palette, dtype=np.int64)
    except (TypeError, ValueError):
        raise TransegError(f"{where}: palette must be [K, 3] RGB ints, got {type(palette).__name__}") from None
    if arr.ndim == 1 and arr.size % 3 == 0:
        arr = arr.reshape(-1, 3)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise TransegError(f"{where}: palette must be [K, 3] RGB ints, got shape {tuple(arr.shape)}")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise TransegError(f"{where}: palette values must be in [0, 255]")
    if need is not None and len(arr) < need:
        raise TransegError(f"{where}: palette has {len(arr)} colours for {need} classes")
    return arr.astype(np.uint8)


def _label_array(label, where: str) -> np.ndarray:
    if hasattr(label, "detach"):
        label = label.detach().cpu().numpy()
    elif isinstance(label, Image.Image):
        label = np.asarray(label)
    arr = np.asarray(label)
    while arr.ndim > 2 and arr.shape[0] == 1:  # [1, H, W] -> [H, W]
        arr = arr[0]
    if arr.ndim != 2:
        raise TransegError(f"{where}: label must be H x W, got shape {tuple(arr.shape)}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise TransegError(f"{where}: label must hold integer class ids, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _image_array(image, where: str) -> np.ndarray:
    """PIL image, HxWx3 / HxW array or [3,H,W] / HxWx3 tensor -> HxWx3 uint8 (floats in [0, 1])."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    is_tensor = hasattr(image, "detach")
    arr = image.detach().cpu().numpy() if is_tensor else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and (is_tensor or arr.shape[-1] not in (1, 3)):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3):
        raise TransegError(f"{where}: image must be H x W x 3 or 3 x H x W, got shape {tuple(arr.shape)}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if np.issubdtype(arr.dtype, np.floating):
        arr = np.rint(np.clip(arr, 0.0, 1.0) * 255.0)
    elif arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255)
    return arr.astype(np.uint8)


def _as_pil(panel, where: str) -> Image.Image:
    if isinstance(panel, Image.Image):
        return panel.convert("RGB")
    return Image.fromarray(_image_array(panel, where))


def _darker(color, f: float = 0.65):
    return tuple(int(c * f) for c in color)


# -------------------------------------------------------------------------- label pictures
def colorize(label, palette=None, ignore_index: int = 255, ignore_color=(0, 0, 0)) -> Image.Image:
    """Label map ``H x W`` (numpy / tensor / PIL 'L'/'P') -> RGB image in the palette's colours.

    Pixels equal to ``ignore_index`` get ``ignore_color``; any other id without a palette colour
    raises :class:`TransegError`.
    """
    lab = _label_array(label, "colorize")
    pal = _palette(palette, where="colorize")
    valid = lab != ignore_index
    bad = valid & ((lab < 0) | (lab >= len(pal)))
    if bad.any():
        raise TransegError(
            f"colorize: label value {int(lab[bad][0])} has no colour (palette has {len(pal)}, ignore_index {ignore_index})"
        )
    rgb = np.empty(lab.shape + (3,), dtype=np.uint8)
    rgb[...] = np.asarray(ignore_color, dtype=np.uint8)
    rgb[valid] = pal[lab[valid]]
    return Image.fromarray(rgb, "RGB")


def overlay(image, label, palette=None, alpha: float = 0.5, ignore_index: int = 255) -> Image.Image:
    """Blend class colours over ``image``: ``out = (1 - alpha) * image + alpha * colour``.

    ``image``: PIL image, ``H x W x 3`` uint8 array, or ``[3, H, W]`` / ``H x W x 3`` tensor
    (uint8, or float in [0, 1] — de-normalise first). Ignored pixels keep the image.
    """
    if not (isinstance(alpha, Real) and 0.0 <= alpha <= 1.0):
        raise TransegError(f"overlay: alpha must be in [0, 1], got {alpha!r}")
    img = _image_array(image, "overlay")
    lab = _label_array(label, "overlay")
    if img.shape[:2] != lab.shape:
        raise TransegError(f"overlay: image is {img.shape[1]}x{img.shape[0]} but label is {lab.shape[1]}x{lab.shape[0]} (W x H)")
    color = np.asarray(colorize(lab, palette, ignore_index), dtype=np.float32)
    out = img.astype(np.float32)
    valid = lab != ignore_index
    out[valid] = (1.0 - alpha) * out[valid] + alpha * color[valid]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def side_by_side(panels, titles=None, gap: int = 8) -> Image.Image:
    """Panels in a row on white, each with its title centred above (e.g. image | pred | GT).

    Panels may differ in size (top-aligned). ``titles`` is one string per panel, or None.
    """
    ims = [_as_pil(p, "side_by_side") for p in panels]
    if not ims:
        raise TransegError("side_by_side: no panels given")
    titles = list(titles) if titles else []
    if titles and len(titles) != len(ims):
        raise TransegError(f"side_by_side: {len(titles)} titles for {len(ims)} panels")
    size = int(np.clip(min(im.width for im in ims) // 16, 12, 22))
    font = _font(size)
    title_h = _line_h(font) + gap if titles else 0
    width = sum(im.width for im in ims) + gap * (len(ims) + 1)
    height = title_h + max(im.height for im in ims) + 2 * gap
    canvas = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(canvas)
    x = gap
    for i, im in enumerate(ims):
        if titles:
            t = _fit(font, str(titles[i]), im.width)
            draw.text((x + (im.width - _text_w(font, t)) // 2, gap // 2 + 2), t, fill=TEXT, font=font)
        canvas.paste(im, (x, title_h + gap))
        x += im.width + gap
    return canvas


def legend(class_names, palette=None, present=None, max_rows: int = 20) -> Image.Image:
    """Colour swatch + name per class (only the ids in ``present`` if given; others ignored).

    More than ``max_rows`` entries wrap into columns.
    """
    names = [str(n) for n in class_names]
    pal = _palette(palette, len(names), "legend")
    ids = [i for i in range(len(names)) if present is None or i in {int(p) for p in present}]
    font = _font(14)
    sw, row_h, pad = 16, 24, 10
    if not ids:
        msg = "(no classes)"
        img = Image.new("RGB", (_text_w(font, msg) + 2 * pad, row_h + 2 * pad), WHITE)
        ImageDraw.Draw(img).text((pad, pad + 4), msg, fill=MUTED, font=font)
        return img
    rows = min(len(ids), max_rows)
    cols = math.ceil(len(ids) / rows)
    col_w = sw + 8 + max(_text_w(font, names[i]) for i in ids) + 24
    img = Image.new("RGB", (cols * col_w + 2 * pad - 24, rows * row_h + 2 * pad), WHITE)
    draw = ImageDraw.Draw(img)
    text_dy = (sw - _line_h(font)) // 2
    for k, i in enumerate(ids):
        x = pad + (k // rows) * col_w
        y = pad + (k % rows) * row_h + (row_h - sw) // 2
        color = tuple(int(c) for c in pal[i])
        draw.rectangle([x, y, x + sw - 1, y + sw - 1], fill=color, outline=_darker(color))
        draw.text((x + sw + 8, y + text_dy), names[i], fill=TEXT, font=font)
    return img
