"""Reading images: any format Pillow reads, as 8-bit RGB with the EXIF orientation applied, bounded in
pixels from the header before decoding. Training data, `predict`, `eval` and the service read through here."""
import io
import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import TransegError
from .files import _kind, regular_file

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# whole-slide images that `transeg predict` finds in a folder beside IMAGE_EXTENSIONS (read by transeg.rasters)
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".scn", ".bif")

_READ_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError)

_EXIF_ORIENTATION = 0x0112



def image_files(paths, skipped=None):
    """The image files among `paths`: files, or folders whose images are taken in name order (other
    files in a folder are left out, and so are entries with an image's name that are not regular files,
    e.g. a FIFO `b.png`: each of those is appended to `skipped`, a list, as (path, what it is)).
    Raises TransegError for a missing path, a named path that is not a regular file or folder, and when
    no image is found."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if f.suffix.lower() not in IMAGE_EXTENSIONS + SLIDE_EXTENSIONS:
                    continue
                try:
                    mode = f.stat().st_mode
                except OSError:
                    mode = None
                if mode is not None and stat.S_ISREG(mode):
                    files.append(f)
                elif skipped is not None and (mode is None or not stat.S_ISDIR(mode)):
                    skipped.append((f, "a broken link" if mode is None else _kind(mode)))
        elif not p.exists() and not p.is_symlink():
            raise TransegError(f"{p}: no such file or directory")
        else:
            files.append(regular_file(p))
    if not files:
        raise TransegError(f"no images found in {', '.join(map(str, paths))}")
    return files



def read_image(path, name=None, max_pixels=None):
    """(uint8 RGB `[H,W,3]` numpy, note) from an image file (a path or a binary file object): EXIF
    orientation applied, grey / alpha / palette / 16-bit images converted to 8-bit RGB, and the note
    says which ("alpha channel dropped", "EXIF orientation applied"; "" for a plain RGB image).
    Only a regular file is read from a path (see `regular_file`).

    max_pixels: refuse larger images from their header, before decoding (a 20 kB 1-bit PNG can hold
    13000x13000 pixels, 0.5 GB as RGB and many GB in a model). With it, this bound replaces Pillow's
    own decompression-bomb warning, and, when it is above Pillow's refusal (2 x Image.MAX_IMAGE_PIXELS),
    that refusal too, for this call only (see `open_image`; Pillow's global is never changed). Raises
    TransegError naming the file (`name`, default: the path)."""
    name = name or path
    if isinstance(path, (str, os.PathLike)):
        regular_file(path, name)
    try:
        with warnings.catch_warnings():
            if max_pixels:  # the bound below is checked instead
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = open_image(path, max_pixels)
        with img:
            w, h = img.size
            if max_pixels and w * h > max_pixels:
                raise TransegError(f"{name}: {w}x{h} pixels ({w * h / 1e6:.3g} megapixels) is more than the "
                                   f"{max_pixels / 1e6:.3g} megapixels allowed, refused before decoding; raise the "
                                   f"limit (--max-megapixels, max_pixels=) if you mean it")
            img.load()
            return image_to_rgb(img)
    except TransegError:
        raise
    except _READ_ERRORS as e:
        raise TransegError(f"{name}: cannot read the image ({_reason(e)})") from None



def open_image(path, max_pixels=None):
    """`Image.open(path)`, except that an image Pillow refuses as a decompression bomb (more than
    2 x Image.MAX_IMAGE_PIXELS) is opened anyway when `max_pixels` allows more than that refusal:
    `read_image` then bounds it by `max_pixels` from the header. Pillow's refusal is a check of its
    module-global MAX_IMAGE_PIXELS that `Image.open` runs after a format plugin has read the header;
    raising that global would change every other reader in the process, so the image is identified
    again as `Image.open` does (registered formats in order, each plugin's `accept` on the first 16
    bytes, then its factory), without the check. Formats whose plugin checks the size again itself
    (TIFF when it loads, WebP, GIF frames and MPO in current Pillow) stay within Pillow's refusal."""
    if not isinstance(path, (str, os.PathLike)):
        try:  # a stream that cannot seek is read once, as Image.open does, so that it can be read again
            path.seek(0)
        except (AttributeError, io.UnsupportedOperation):
            path = io.BytesIO(path.read())
    try:
        return Image.open(path)
    except Image.DecompressionBombError:
        if not (max_pixels and Image.MAX_IMAGE_PIXELS and max_pixels > 2 * Image.MAX_IMAGE_PIXELS):
            raise
        img = _identify(path)
        if img is None:
            raise
        return img


def _identify(path):
    """The image at `path` (a path or a seekable binary file) from the first registered format plugin
    that accepts and parses its header, as `Image.open` picks it, without Pillow's size check; None
    when no plugin does."""
    is_path = isinstance(path, (str, os.PathLike))
    if is_path:
        with open(path, "rb") as f:
            prefix = f.read(16)
    else:
        path.seek(0)
        prefix = path.read(16)
    for fmt in list(Image.ID):
        factory, accept = Image.OPEN[fmt]
        accepted = not accept or accept(prefix)
        if isinstance(accepted, str) or not accepted:  # a string is Pillow's warning of a near miss
            continue
        try:
            if is_path:  # the image owns the file it opens, and closes it with itself
                return factory(os.fspath(path))
            path.seek(0)
            return factory(path, "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # not this format: Image.open goes on too
            continue
    return None


def load_image(path):
    """`read_image` without the note."""
    return read_image(path)[0]



_MODE_NOTES = {"L": "greyscale converted to RGB", "LA": "greyscale + alpha converted to RGB (alpha dropped)",
               "RGBA": "alpha channel dropped", "PA": "palette + alpha converted to RGB (alpha dropped)",
               "P": "palette image converted to RGB", "CMYK": "CMYK converted to RGB", "YCbCr": "YCbCr converted to RGB",
               "1": "1-bit image converted to RGB", "I": "32-bit integer image converted to 8-bit RGB",
               "F": "floating-point image converted to 8-bit RGB"}



def image_to_rgb(img):
    """(uint8 RGB `[H,W,3]`, note) from a decoded PIL image, as `read_image` does for files."""
    mode = img.mode
    notes = ["16-bit greyscale scaled to 8-bit RGB" if mode.startswith("I;16") else _MODE_NOTES.get(mode, "")]
    try:
        if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            notes.append("EXIF orientation applied")
    except Exception:  # a broken EXIF block only loses the orientation, as in exif_transpose
        pass
    return _to_rgb(ImageOps.exif_transpose(img)), ", ".join(n for n in notes if n)



def _reason(e):
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__



def _to_rgb(img):
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey: scale 0..65535 to 0..255 (Pillow's own convert would clip at 255); a
        # 32-bit "I" image whose values already fit in 0..255 is kept as it is
        a = np.asarray(img).astype(np.float64)
        if img.mode != "I" or a.size == 0 or a.max() > 255:
            a = np.round(a / 257.0)
        a = np.clip(a, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float32)
        a = a * 255.0 if a.size and float(np.nanmax(a)) <= 1.0 else a
        a = np.clip(np.nan_to_num(np.round(a)), 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img)



def _oriented_size(img):
    """(h, w) after EXIF orientation, without decoding the pixels."""
    w, h = img.size
    try:
        if img.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
            w, h = h, w
    except Exception:  # a broken EXIF block only loses the orientation, as in exif_transpose
        pass
    return h, w

