"""Joint image + label transforms: the SegFormer training and test pipelines.

These reproduce the pipeline of the SegFormer release (mmseg v0.13 on mmcv 1.2.7, OpenCV 4.x)
step by step, on torch tensors instead of OpenCV arrays:

training  Resize(img_scale, ratio_range, keep_ratio) -> RandomCrop(crop, cat_max_ratio)
          -> RandomFlip(0.5) -> PhotoMetricDistortion -> Normalize -> Pad(crop, img 0, label 255)
test      keep-ratio rescale to fit `scale` -> AlignedResize (stretch to multiples of 32)
          -> Normalize

Conventions: images are `uint8 [3,H,W]` RGB, labels `int64 [H,W]` with 255 = ignore; mean/std
are in 0-255 units. Sizes written `(h, w)` are height first (crop sizes); `scale` follows mmcv
and is orientation-free: `(2048, 512)` means "long side <= 2048 and short side <= 512".

As in mmseg, the image stays 8-bit until Normalize: each resize and each photometric step
rounds or truncates back to integers 0..255 exactly where OpenCV/numpy would. Resizing uses
`F.interpolate` (bilinear, align_corners=False, no antialias), which is OpenCV's INTER_LINEAR
up to OpenCV's 11-bit fixed-point weights (at most one grey level apart); nearest-neighbour
label resizing uses OpenCV's index rule exactly.

All randomness comes from the `numpy.random.Generator` passed in, drawn in mmseg's order
(ratio, crop offsets, flip, photometric), so a sample is a pure function of (input, rng state).
"""
import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
# ViT weights trained on [-1, 1] inputs (Google's AugReg ViTs, which Segmenter and SegViT start from)
VIT_MEAN = (127.5, 127.5, 127.5)
VIT_STD = (127.5, 127.5, 127.5)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TrainTransform",
    "TestTransform",
    "normalize",
    "rescale_size",
    "resize_image",
    "resize_label",
    "random_crop_box",
    "photometric_distortion",
    "rgb_to_hsv_u8",
    "hsv_to_rgb_u8",
]


# ----------------------------------------------------------------------------------------------
# geometry


def rescale_size(size_wh, scale):
    """mmcv `rescale_size`: the (w, h) an image of `size_wh` gets when rescaled to fit `scale`.

    `scale` is a float factor, or a (long, short) bound in either order: the factor is
    min(long_bound / long_side, short_bound / short_side). New sides are `int(x * factor + 0.5)`.
    """
    w, h = size_wh
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if scale <= 0:
            raise ValueError(f"invalid scale {scale}: must be positive")
        factor = float(scale)
    else:
        long_bound, short_bound = max(scale), min(scale)
        factor = min(long_bound / max(h, w), short_bound / min(h, w))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def resize_image(image, size_hw):
    """Bilinear resize of an 8-bit image `[3,H,W]` (or `[N,3,H,W]`) to `size_hw`, back to uint8.

    Like cv2.resize(INTER_LINEAR): half-pixel centres, no antialiasing when shrinking, result
    rounded to 8 bits. Returns the input unchanged when the size already matches.
    """
    h, w = size_hw
    if tuple(image.shape[-2:]) == (h, w):
        return image
    batched = image.dim() == 4
    x = image.float() if batched else image.float().unsqueeze(0)
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x if batched else x[0]


def _nearest_index(src, dst):
    # OpenCV INTER_NEAREST: source index floor(x * ifx) with ifx = 1 / (dst / src), clamped.
    ifx = 1.0 / (dst / src)
    return np.minimum(np.floor(np.arange(dst) * ifx).astype(np.int64), src - 1)


def resize_label(label, size_hw):
    """Nearest-neighbour resize of a label map `[H,W]` (any dtype) with OpenCV's index rule."""
    h, w = size_hw
    src_h, src_w = label.shape[-2:]
    if (src_h, src_w) == (h, w):
        return label
    rows, cols = _nearest_index(src_h, h), _nearest_index(src_w, w)
    return torch.from_numpy(label.numpy()[np.ix_(rows, cols)])


def random_crop_box(label, crop_hw, rng, cat_max_ratio=1.0, ignore_index=255, tries=10):
    """mmseg RandomCrop's box choice: `(y1, y2, x1, x2)`.

    Offsets are uniform in [0, H - ch] x [0, W - cw] (0 when the image is smaller). With
    cat_max_ratio < 1 the box is redrawn while its crop of `label` has at most one non-ignore
    class, or one class covers >= cat_max_ratio of the non-ignore pixels, up to `tries` times.
    Quirk kept from mmseg: after the last failed check a fresh box is drawn and used unchecked,
    so a hopeless label consumes tries + 1 boxes.
    """
    ch, cw = crop_hw
    h, w = label.shape[-2:]
    margin_h, margin_w = max(h - ch, 0), max(w - cw, 0)

    def draw():
        y = int(rng.integers(0, margin_h + 1))
        x = int(rng.integers(0, margin_w + 1))
        return y, y + ch, x, x + cw

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            y1, y2, x1, x2 = box
            crop = np.asarray(label[y1:y2, x1:x2]).ravel()
            counts = np.bincount(crop, minlength=ignore_index + 1)
            counts[ignore_index] = 0
            counts = counts[counts > 0]
            if counts.size > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = draw()
    return box


# ----------------------------------------------------------------------------------------------
# colour (OpenCV 8-bit HSV: H in 0..179 = degrees / 2, S and V in 0..255)

_HSV_SHIFT = 12
# OpenCV's fixed-point tables: saturate_cast<int> rounds half to even, as Python's round does.
_SDIV = np.array([0] + [round((255 << _HSV_SHIFT) / i) for i in range(1, 256)], dtype=np.int32)
_HDIV180 = np.array([0] + [round((180 << _HSV_SHIFT) / (6.0 * i)) for i in range(1, 256)], dtype=np.int32)
_INV255 = np.float32(1.0) / np.float32(255.0)  # the float32 constant 1.0f / 255.0f
_HSCALE = np.float32(6.0) / np.float32(180.0)  # 6.0f / hrange
_SIXTH = np.float32(1.0) / np.float32(6.0)
_ONE = np.float32(1.0)
_F255 = np.float32(255.0)
# (The colour code runs in numpy: its table look-ups cost less than torch's indexing.)


def rgb_to_hsv_u8(image):
    """cv2.cvtColor(COLOR_RGB2HSV) on an 8-bit image `[3,H,W]` (any integer-valued dtype).

    Returns int32 `[3,H,W]` (H, S, V): OpenCV's integer arithmetic, bit for bit.
    """
    rgb = image.numpy().astype(np.int32) if torch.is_tensor(image) else np.asarray(image, dtype=np.int32)
    r, g, b = rgb[0], rgb[1], rgb[2]
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    # red max wins over green max, green over blue (OpenCV's vr / vg masks)
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV180[diff] + half) >> _HSV_SHIFT  # arithmetic shift = floor, as in C
    h += np.where(h < 0, 180, 0).astype(np.int32)
    return torch.from_numpy(np.stack([h, s, v]))


def hsv_to_rgb_u8(hsv):
    """cv2.cvtColor(COLOR_HSV2RGB) on 8-bit HSV `[3,H,W]`; returns uint8 RGB `[3,H,W]`.

    Follows OpenCV's vectorised (SIMD) path, which every pixel of an image but a short tail
    takes on x86: float32 arithmetic, sector from trunc(h * 6/180), and the final `* 255`
    TRUNCATED to 8 bits (the scalar tail would round). Deliberate quirk: the truncation.
    """
    hsv = hsv.numpy() if torch.is_tensor(hsv) else np.asarray(hsv)
    h = hsv[0].astype(np.float32) * _HSCALE
    s = hsv[1].astype(np.float32) * _INV255
    v = hsv[2].astype(np.float32) * _INV255
    pre = np.trunc(h)
    h = h - pre
    tab = np.stack([v, v * (_ONE - s), v * (_ONE - s * h), v * (_ONE - s * (_ONE - h))])
    sector = (pre - np.trunc(pre * _SIXTH) * np.float32(6.0)).astype(np.int64)
    # which tab entry each output channel takes, per sector 0..5 (OpenCV's sector_data)
    pick = _SECTOR_TABS[:, sector]  # [3,H,W] indices into tab
    rgb = np.take_along_axis(tab, pick, axis=0) * _F255
    return torch.from_numpy(np.clip(np.trunc(rgb), 0, 255).astype(np.uint8))


#                          sector: 0  1  2  3  4  5
_SECTOR_TABS = np.array([[0, 2, 1, 1, 3, 0],   # r
                         [3, 0, 0, 2, 1, 1],   # g
                         [1, 1, 3, 0, 0, 2]])  # b


def _convert(x, alpha=1.0, beta=0.0):
    # mmseg PhotoMetricDistortion.convert: float32 x * alpha + beta, clip to [0, 255], astype(uint8)
    # (astype truncates; values are >= 0 after the clip, so truncation is floor).
    y = x.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.trunc(np.clip(y, 0, 255, out=y), out=y)


def photometric_distortion(image, rng, brightness_delta=32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta=18):
    """mmseg PhotoMetricDistortion on an 8-bit RGB image `[3,H,W]`; returns uint8 `[3,H,W]`.

    Each step happens with probability 1/2: brightness + U(-32, 32); contrast * U(0.5, 1.5),
    either right after brightness or last (a coin flip); saturation * U(0.5, 1.5) and hue + an
    integer in [-18, 17] (numpy randint's exclusive upper end: the +18 shift never happens,
    kept deliberately), both in OpenCV 8-bit HSV with the hue wrapped modulo 180. Every step
    clips to [0, 255] and truncates to 8 bits, as mmseg does on its uint8 image. No channel swap.
    (Runs in numpy: single-threaded elementwise work there beats torch's thread pool on small
    images.)
    """
    img = image.numpy() if torch.is_tensor(image) else np.asarray(image)
    img = img.astype(np.float32)

    def contrast(x):
        if rng.integers(2):
            return _convert(x, alpha=rng.uniform(*contrast_range))
        return x

    if rng.integers(2):  # brightness
        img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
    mode = rng.integers(2)  # 1: contrast second, 0: contrast last
    if mode == 1:
        img = contrast(img)
    if rng.integers(2):  # saturation
        hsv = rgb_to_hsv_u8(img).numpy()
        hsv[1] = _convert(hsv[1], alpha=rng.uniform(*saturation_range))
        img = hsv_to_rgb_u8(hsv).numpy().astype(np.float32)
    if rng.integers(2):  # hue
        hsv = rgb_to_hsv_u8(img).numpy()
        hsv[0] = np.mod(hsv[0] + int(rng.integers(-hue_delta, hue_delta)), 180)
        img = hsv_to_rgb_u8(hsv).numpy().astype(np.float32)
    if mode == 0:
        img = contrast(img)
    return torch.from_numpy(img.astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# normalisation


def normalize(image_uint8, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """`(image - mean) / std` per channel, float32; works on `[3,H,W]` and `[N,3,H,W]`."""
    x = image_uint8.float()
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    inv_std = torch.tensor([1.0 / s for s in std], dtype=torch.float32).view(3, 1, 1)
    return (x - mean_t) * inv_std  # mmcv multiplies by 1/std


def _check_pair(image, label):
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3,H,W], got {tuple(image.shape)}")
    if label.dim() != 2 or tuple(label.shape) != tuple(image.shape[1:]):
        raise ValueError(f"label must be [H,W] = {tuple(image.shape[1:])}, got {tuple(label.shape)}")


# ----------------------------------------------------------------------------------------------
# pipelines


class TrainTransform:
    """SegFormer's training pipeline on one (image, label) pair.

    Resize: a ratio r ~ U(ratio_range) scales `scale` to (int(scale[0] r), int(scale[1] r)) and
    the image is rescaled (aspect kept) to fit it. `scale=None` uses the image's own (w, h) as
    the base instead (mmseg's "mode 1"); `ratio_range=None` uses `scale` as is; both None skips
    the resize. Then RandomCrop to `crop_size` (h, w) with the cat_max_ratio retries, RandomFlip
    (horizontal, p=flip_prob), PhotoMetricDistortion (if `photometric`), Normalize, and Pad on
    the bottom/right to `crop_size` (image 0 after normalisation, label `ignore_index`).

    Returns float32 `[3,ch,cw]` and int64 `[ch,cw]`.
    """

    def __init__(self, crop_size=(512, 512), scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                 flip_prob=0.5, photometric=True, mean=IMAGENET_MEAN, std=IMAGENET_STD, ignore_index=255):
        if isinstance(crop_size, int):
            crop_size = (crop_size, crop_size)
        self.crop_size = tuple(int(c) for c in crop_size)
        if len(self.crop_size) != 2 or min(self.crop_size) <= 0:
            raise ValueError(f"crop_size must be (h, w) > 0, got {crop_size}")
        self.scale = tuple(scale) if scale is not None else None
        self.ratio_range = tuple(ratio_range) if ratio_range is not None else None
        if self.ratio_range is not None and self.ratio_range[0] > self.ratio_range[1]:
            raise ValueError(f"ratio_range must be (min, max), got {ratio_range}")
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.photometric = bool(photometric)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.ignore_index = int(ignore_index)

    def __repr__(self):
        return (f"TrainTransform(crop_size={self.crop_size}, scale={self.scale}, ratio_range={self.ratio_range}, "
                f"cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob}, photometric={self.photometric})")

    # the steps, in pipeline order; each is usable on its own

    def resize(self, image, label, rng):
        h, w = image.shape[-2:]
        if self.ratio_range is not None:
            lo, hi = self.ratio_range
            ratio = rng.random() * (hi - lo) + lo
            base = self.scale if self.scale is not None else (w, h)
            target = (int(base[0] * ratio), int(base[1] * ratio))
        elif self.scale is not None:
            target = self.scale
        else:
            return image, label
        new_w, new_h = rescale_size((w, h), target)
        return resize_image(image, (new_h, new_w)), resize_label(label, (new_h, new_w))

    def crop(self, image, label, rng):
        y1, y2, x1, x2 = random_crop_box(label, self.crop_size, rng, self.cat_max_ratio, self.ignore_index)
        return image[:, y1:y2, x1:x2], label[y1:y2, x1:x2]

    def flip(self, image, label, rng):
        if rng.random() < self.flip_prob:
            return image.flip(-1), label.flip(-1)
        return image, label

    def pad(self, image, label):
        ch, cw = self.crop_size
        h, w = image.shape[-2:]
        if (h, w) == (ch, cw):
            return image, label
        out = image.new_zeros((image.shape[0], max(ch, h), max(cw, w)))
        out[:, :h, :w] = image
        lab = label.new_full((max(ch, h), max(cw, w)), self.ignore_index)
        lab[:h, :w] = label
        return out, lab

    def __call__(self, image, label, rng):
        _check_pair(image, label)
        image, label = self.resize(image, label, rng)
        image, label = self.crop(image, label, rng)
        image, label = self.flip(image, label, rng)
        if self.photometric:
            image = photometric_distortion(image, rng)
        image = normalize(image, self.mean, self.std)
        image, label = self.pad(image, label.long())
        return image.contiguous(), label.contiguous()


class TestTransform:
    """SegFormer's test pipeline on one image: keep-ratio rescale to fit `scale`, then (unless
    `size_divisor` is None) AlignedResize's second bilinear resize that stretches the image to
    (ceil(h/d)*d, ceil(w/d)*d), then Normalize. `scale=None` skips the first resize.

    Returns float32 `[3,h',w']`. Predictions are resized back to the original size by the caller.
    """

    __test__ = False  # its name starts with "Test": tell pytest it is not a test class

    def __init__(self, scale=(2048, 512), size_divisor=32, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.scale = tuple(scale) if scale is not None else None
        self.size_divisor = int(size_divisor) if size_divisor else None
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __repr__(self):
        return f"TestTransform(scale={self.scale}, size_divisor={self.size_divisor})"

    def output_size(self, size_hw):
        """The (h', w') an input of `size_hw` comes out at."""
        h, w = size_hw
        if self.scale is not None:
            w, h = rescale_size((w, h), self.scale)
        if self.size_divisor:
            d = self.size_divisor
            h, w = -(-h // d) * d, -(-w // d) * d
        return h, w

    def __call__(self, image):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be [3,H,W], got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        if self.scale is not None:
            new_w, new_h = rescale_size((w, h), self.scale)
            image = resize_image(image, (new_h, new_w))  # rounded to 8 bits in between, as in mmcv
        if self.size_divisor:
            d = self.size_divisor
            h, w = image.shape[-2:]
            image = resize_image(image, (-(-h // d) * d, -(-w // d) * d))  # AlignedResize's stretch
        return normalize(image, self.mean, self.std).contiguous()
