"""Label maps drawn as pictures: class colours, overlays, titled panels and legends.

Drawn with Pillow (the charts, in :mod:`transeg.charts`, with matplotlib). Every function returns an RGB ``PIL.Image``; save it with
``img.save("x.png")``, or with :func:`save_image`, which writes atomically (what the CLI does).

* :func:`colorize` / :func:`overlay` — a label map in class colours, alone or blended over the image.
* :func:`side_by_side` — titled panels on white, e.g. image | prediction | ground truth.
* :func:`legend` — colour swatches with class names; :func:`add_legend` — the classes present, with
  their colours and shares, drawn into a corner of an overlay (what `transeg predict` writes).
* :func:`prediction_grid` — image | prediction | ground truth for several samples, with a legend.
* :func:`drawable` — text with every character the font has no glyph for replaced (em dash -> "-"),
  so no picture shows a missing-glyph box.

A ``palette`` is anything shaped like ``[K, 3]`` (list of RGB tuples, flat list of 3K ints, numpy
array, tensor); ``None`` means :func:`transeg.data.palettes.default_palette`, the PASCAL VOC colour
map, which has a distinct colour per id.

The palette parsing here is shared with :mod:`transeg.charts` (matplotlib charts), which imports it
from this module.
"""
from __future__ import annotations

import functools
import math
from numbers import Real

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from transeg.data.palettes import default_palette
from transeg.files import atomic_write, plain_permissions
from transeg.errors import TransegError

__all__ = ["colorize", "overlay", "side_by_side", "legend", "add_legend", "prediction_grid", "class_shares", "save_image",
           "drawable", "has_glyph"]

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
    :func:`transeg.files.atomic_write`): a full disk or a read-only folder is one TransegError line
    naming the file, and neither a half-written image nor a temporary is left; an existing file is
    replaced only by a complete one. ``params`` go to ``Image.save`` (e.g. quality=92). Returns the path."""

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


# What to draw for a character the font has no glyph for. Pillow's bundled font (Aileron, a subset)
# has ASCII and a little punctuation only: an em dash, x-sign or accented letter would be drawn as
# its missing-glyph box ("tofu"). Accented letters lose their accent (NFKD); anything else is "?".
_SUBSTITUTES = {"\u2014": "-", "\u2013": "-", "\u2212": "-", "\u00d7": "x", "\u2265": ">=", "\u2264": "<=",
                "\u2192": "->", "\u2190": "<-", "\u00b2": "^2", "\u00b3": "^3", "\u2026": "...", "\u00b5": "u",
                "\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " ", "\u00df": "ss"}


@functools.lru_cache(maxsize=64)
def _missing_glyph(font):
    """The font's missing-glyph bitmap (size, bytes): what it draws for a code point it lacks."""
    mask = font.getmask("\U0010ffff")  # a non-character: no font maps it
    return mask.size, bytes(mask)


@functools.lru_cache(maxsize=4096)
def has_glyph(font, char: str) -> bool:
    """True when ``font`` draws ``char`` with a glyph of its own, not its missing-glyph box."""
    if char.isspace() or char.isascii() and char.isprintable():
        return True
    mask = font.getmask(char)
    return (mask.size, bytes(mask)) != _missing_glyph(font)


def drawable(font, text: str) -> str:
    """``text`` with every character ``font`` has no glyph for replaced by a look-alike it has
    (em dash -> "-", x-sign -> "x", e-acute -> "e", ...) or "?": never a missing-glyph box."""
    import unicodedata

    text = str(text)
    if all(has_glyph(font, c) for c in text):
        return text
    out = []
    for c in text:
        if has_glyph(font, c):
            out.append(c)
            continue
        sub = _SUBSTITUTES.get(c)
        if sub is None:
            base = "".join(b for b in unicodedata.normalize("NFKD", c) if not unicodedata.combining(b))
            sub = base if base and all(has_glyph(font, b) for b in base) else "?"
        out.append(sub)
    return "".join(out)


def _draw_text(draw, xy, text: str, fill, font):
    """``draw.text`` of :func:`drawable` text (what every picture here draws through)."""
    draw.text(xy, drawable(font, text), fill=fill, font=font)


def _text_w(font, text: str) -> int:
    text = drawable(font, text)
    if not text:
        return 0
    l, _, r, _ = font.getbbox(text)
    return r - l


def _line_h(font) -> int:
    _, t, _, b = font.getbbox("Ag|")
    return b + max(t, 0)


def _fit(font, text: str, width: int) -> str:
    """``text`` (made :func:`drawable`) shortened with an ellipsis so it fits in ``width`` pixels."""
    text = drawable(font, text)
    if _text_w(font, text) <= width:
        return text
    while text and _text_w(font, text + "...") > width:
        text = text[:-1]
    return text + "..." if text else ""


def palette_array(palette, need: int | None = None, where: str = "palette") -> np.ndarray:
    """A palette as uint8 [K, 3] (None: the default colours), checked: RGB values in 0-255, at least `need`
    colours; a bad one is one TransegError line naming `where`."""
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
    pal = palette_array(palette, where="colorize")
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
            _draw_text(draw, (x + (im.width - _text_w(font, t)) // 2, gap // 2 + 2), t, fill=TEXT, font=font)
        canvas.paste(im, (x, title_h + gap))
        x += im.width + gap
    return canvas


def legend(class_names, palette=None, present=None, max_rows: int = 20) -> Image.Image:
    """Colour swatch + name per class (only the ids in ``present`` if given; others ignored).

    More than ``max_rows`` entries wrap into columns.
    """
    names = [str(n) for n in class_names]
    pal = palette_array(palette, len(names), "legend")
    ids = [i for i in range(len(names)) if present is None or i in {int(p) for p in present}]
    font = _font(14)
    sw, row_h, pad = 16, 24, 10
    if not ids:
        msg = "(no classes)"
        img = Image.new("RGB", (_text_w(font, msg) + 2 * pad, row_h + 2 * pad), WHITE)
        _draw_text(ImageDraw.Draw(img), (pad, pad + 4), msg, fill=MUTED, font=font)
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
        _draw_text(draw, (x + sw + 8, y + text_dy), names[i], fill=TEXT, font=font)
    return img


def class_shares(label, num_classes: int, ignore_index: int = 255):
    """[(class id, share of all pixels)] of the classes present in ``label``, largest first (ties: lower id)."""
    lab = _label_array(label, "class_shares")
    valid = lab[(lab != ignore_index) & (lab >= 0) & (lab < num_classes)]
    counts = np.bincount(valid.ravel(), minlength=num_classes)[:num_classes]
    order = sorted((i for i in range(num_classes) if counts[i]), key=lambda i: (-counts[i], i))
    return [(i, float(counts[i] / max(lab.size, 1))) for i in order]


def _share_text(share: float) -> str:
    return "<1%" if share < 0.005 else f"{100 * share:.0f}%"


def add_legend(picture, label, class_names, palette=None, ignore_index: int = 255, opacity: float = 0.85):
    """``picture`` (an overlay of ``label``, the image size) with a legend drawn in one corner: a swatch
    in the class colour, the class name and its share of the pixels, for each class present, largest
    share first. The picture keeps its size, so it stays pixel-aligned with the input image.

    The box goes in the corner where it hides the fewest class boundaries, on a white backing at
    ``opacity``; its text scales with the picture (short side / 32 px, 10..32). It may take at most
    half the picture's width and height: classes beyond what fits are summed in a "+N more" row, and a
    picture too small for even two rows (about 60 px) gets no legend. Returns a new RGB image.
    """
    img = _as_pil(picture, "add_legend")
    lab = _label_array(label, "add_legend")
    if (img.height, img.width) != lab.shape:
        raise TransegError(f"add_legend: picture is {img.width}x{img.height} but label is {lab.shape[1]}x{lab.shape[0]} (W x H)")
    names = [str(n) for n in class_names]
    pal = palette_array(palette, len(names), "add_legend")
    entries = class_shares(lab, len(names), ignore_index)
    if not entries:
        return img
    font = _font(int(np.clip(min(img.size) // 32, 10, 32)))
    line_h = _line_h(font)
    sw = max(line_h, 8)
    pad, gap = max(sw // 2, 4), max(sw // 3, 3)
    row_h = sw + gap
    max_w, max_h = img.width // 2, img.height // 2
    rows = [(pal[i], f"{names[i]} {_share_text(s)}") for i, s in entries]
    fit = max(0, (max_h - 2 * pad + gap) // row_h)
    if fit < len(rows):
        if fit < 2:
            return img
        rest = entries[fit - 1:]
        rows = rows[:fit - 1] + [(None, f"+{len(rest)} more ({_share_text(sum(s for _, s in rest))})")]
    text_w = min(max(_text_w(font, t) for _, t in rows), max_w - 2 * pad - sw - gap)
    if text_w < 3 * sw:
        return img
    box_w, box_h = 2 * pad + sw + gap + text_w, 2 * pad + len(rows) * row_h - gap
    # the corner whose box covers the fewest pixels at a class boundary (ties: top-left first)
    edges = np.zeros(lab.shape, dtype=np.int64)
    edges[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edges[1:, :] |= lab[1:, :] != lab[:-1, :]
    corners = [(0, 0), (img.width - box_w, 0), (0, img.height - box_h), (img.width - box_w, img.height - box_h)]
    x0, y0 = min(corners, key=lambda c: int(edges[c[1]:c[1] + box_h, c[0]:c[0] + box_w].sum()))
    out = img.copy()
    backing = Image.blend(out.crop((x0, y0, x0 + box_w, y0 + box_h)), Image.new("RGB", (box_w, box_h), WHITE), opacity)
    out.paste(backing, (x0, y0))
    draw = ImageDraw.Draw(out)
    draw.rectangle([x0, y0, x0 + box_w - 1, y0 + box_h - 1], outline=MUTED)
    for k, (color, text) in enumerate(rows):
        y = y0 + pad + k * row_h
        if color is not None:
            color = tuple(int(c) for c in color)
            draw.rectangle([x0 + pad, y, x0 + pad + sw - 1, y + sw - 1], fill=color, outline=_darker(color))
        _draw_text(draw, (x0 + pad + sw + gap, y + (sw - line_h) // 2), _fit(font, text, text_w), fill=TEXT, font=font)
    return out


def _panel(picture, box: int, labels: bool) -> Image.Image:
    """``picture`` scaled so its longer side is ``box`` px: nearest-neighbour for label maps and when
    enlarging (pixels stay crisp), Lanczos when shrinking a photo."""
    scale = box / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    if size == picture.size:
        return picture
    return picture.resize(size, Image.NEAREST if labels or scale > 1 else Image.LANCZOS)


def prediction_grid(samples, class_names, palette=None, per_row: int = 2, box: int = 256, alpha: float = 0.5,
                    ignore_index: int = 255) -> Image.Image:
    """The picture the README shows: for each sample, image | prediction (overlay) | ground truth,
    ``per_row`` samples to a row, each panel scaled to ``box`` px on its longer side and titled, with a
    legend of the classes present (in any prediction or truth) below.

    ``samples``: dicts with "image" (HxWx3 uint8 / PIL / tensor), "prediction" (label map of the
    image's size), optional "truth" (label map of the same size; without it the row has two panels)
    and optional "title" (default "image N").
    """
    samples = list(samples)
    if not samples:
        raise TransegError("prediction_grid: no samples given")
    if per_row < 1:
        raise TransegError(f"prediction_grid: per_row must be at least 1, got {per_row}")
    names = [str(n) for n in class_names]
    pal = palette_array(palette, len(names), "prediction_grid")
    present, panels, titles = set(), [], []
    for n, sample in enumerate(samples):
        image = _as_pil(sample["image"], "prediction_grid")
        pred = _label_array(sample["prediction"], "prediction_grid")
        truth = sample.get("truth")
        row = [(_panel(image, box, False), str(sample.get("title") or f"image {n}")),
               (_panel(overlay(image, pred, pal, alpha, ignore_index), box, False), "prediction (overlay)")]
        present.update(int(v) for v in np.unique(pred))
        if truth is not None:
            truth = _label_array(truth, "prediction_grid")
            if truth.shape != pred.shape:
                raise TransegError(f"prediction_grid: {row[0][1]}: truth is {truth.shape[1]}x{truth.shape[0]} but the "
                                   f"image is {pred.shape[1]}x{pred.shape[0]} (W x H)")
            row.append((_panel(colorize(truth, pal, ignore_index), box, True), "ground truth"))
            present.update(int(v) for v in np.unique(truth))
        panels.append([p for p, _ in row])
        titles.append([t for _, t in row])
    lines = []
    for start in range(0, len(samples), per_row):
        flat = [p for ps in panels[start:start + per_row] for p in ps]
        lines.append(side_by_side(flat, [t for ts in titles[start:start + per_row] for t in ts]))
    key = legend(names, pal, present={p for p in present if p != ignore_index})
    width = max(im.width for im in lines + [key])
    canvas = Image.new("RGB", (width, sum(im.height for im in lines) + key.height), WHITE)
    y = 0
    for im in lines + [key]:
        canvas.paste(im, (0, y))
        y += im.height
    return canvas
