"""The built-in synthetic dataset: the default whenever no data is given.

Every sample is drawn on the fly from `numpy.random.default_rng([seed, split, index])`, so it is
the same in every process and every run, needs no files, and the train / val / test splits come
from disjoint seed streams.

A scene (6 classes: sky, ground, disc, box, triangle, ring):

- sky: everything above a wavy horizon (two random sinusoids around 25-60 % of the height),
  a smooth vertical gradient in a day (blue to pale), dusk (indigo to orange / pink) or
  overcast (grey) colour family;
- ground: everything below it, textured with stripes (random angle and period), a checker or
  speckle (random cells of 1-3 pixels) in two shades of grass, earth or stone;
- 1-5 objects: disc (near-circular ellipse), box (rectangle, tilted up to 15 degrees),
  triangle (near-equilateral, pointing up within 15 degrees) or ring (an annulus whose hole
  shows whatever is behind it). An object's size, the square root of its area, is 8-35 % of
  the image's short side (scale variation; equal areas keep the four shape classes about
  equally frequent). Objects are drawn in random order, so later ones occlude earlier ones,
  but a placement that would hide more than 40 % of an earlier object is redrawn (up to 4
  times), and about three quarters of each object lies inside the image;
- context: discs sit in the sky (like suns or balloons) and boxes and triangles on the ground
  (like crates and tents) 70 % of the time, anywhere otherwise; rings go anywhere;
- object colours come from ONE distribution for every shape class (vivid: any hue, saturation
  and value >= 0.5, redrawn until it stands out from what is underneath), and 20 % of the
  objects are two-colour striped or checked. So colour never tells which shape a pixel
  belongs to: outline, corners, the hole and the surroundings do;
- finally per-pixel Gaussian noise of a random strength (sigma 2-5 grey levels).

Pixel shares on the val split: sky 37 %, ground 48 %, disc 4.3 %, box 3.6 %, triangle 4.1 %,
ring 2.9 %. Samples are made on the fly, cheaply enough that data loading never waits on them
(BENCHMARKS.md: Synthetic data).

Learnability: SegFormer-B0 from scratch, batch 8, AdamW lr 1e-3
(head x10), poly schedule, 1500 iterations on one CPU thread, crop 128 with
TrainTransform(scale=(512, 128)): val mIoU 0.63 with ratio_range (0.5, 2.0), 0.72 with
(0.75, 1.5) (the data already varies object scale; shrinking a 128 image to 64 mostly adds
padding). Sky / ground reach 0.95 within 500 iterations; the shape classes take the time.
"""
import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..errors import TransegError
from .summary import summarize

CLASSES = ["sky", "ground", "disc", "box", "triangle", "ring"]
PALETTE = [(110, 170, 230), (130, 95, 60), (220, 60, 60), (60, 180, 90), (240, 200, 50), (170, 80, 210)]
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
DEFAULT_NUM_SAMPLES = {"train": 2000, "val": 100, "test": 100}

SKY, GROUND, DISC, BOX, TRIANGLE, RING = range(6)


class SyntheticDataset(torch.utils.data.Dataset):
    """Procedural scenes of sky, ground and four shape classes (see the module docstring).

    split: "train", "val" or "test" (disjoint seed streams). num_samples: defaults to 2000 for
    train and 100 otherwise. size: (height, width) or one int. seed: any non-negative int.
    Items are dicts: image uint8 [3,H,W] RGB, label int64 [H,W], name str.
    """

    classes = list(CLASSES)
    palette = list(PALETTE)
    ignore_index = 255

    def __init__(self, split="train", num_samples=None, size=(128, 128), seed=0):
        if split not in SPLIT_IDS:
            raise TransegError(f"synthetic data: unknown split {split!r} (use train, val or test)")
        if isinstance(size, int):
            size = (size, size)
        size = tuple(int(s) for s in size)
        if len(size) != 2 or min(size) < 16:
            raise TransegError(f"synthetic data: size must be at least 16x16 pixels, got {size}")
        if num_samples is None:
            num_samples = DEFAULT_NUM_SAMPLES[split]
        if int(num_samples) < 1:
            raise TransegError(f"synthetic data: the number of samples must be >= 1, got {num_samples}")
        if int(seed) < 0:
            raise TransegError(f"synthetic data: seed must be >= 0, got {seed}")
        self.split = split
        self.num_samples = int(num_samples)
        self.size = size
        self.seed = int(seed)
        self.classes = list(CLASSES)
        self.palette = list(PALETTE)
        h, w = size
        self._yy, self._xx = np.mgrid[0:h, 0:w].astype(np.float32)

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return self.num_samples

    def __repr__(self):
        return (f"SyntheticDataset(split={self.split!r}, num_samples={self.num_samples}, "
                f"size={self.size}, seed={self.seed})")

    def check(self, progress=True, decode_images=True):
        """Summary of the generated split (sizes, label values, class balance), as FolderDataset.check
        gives for files; `decode_images` is accepted for the same call and has nothing to skip here."""
        return summarize(self, progress)

    def __getitem__(self, index):
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], index])
        image, label = self._scene(rng)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "label": torch.from_numpy(label.astype(np.int64)),
            "name": f"synthetic_{self.split}_{index:05d}",
        }

    # -- drawing ------------------------------------------------------------------------------

    @staticmethod
    def _pattern(rng, kind, period, yy, xx):
        """A {0,1} float32 map over the coordinates (yy, xx): stripes at a random angle, or a
        checkerboard, with a random phase."""
        inv = np.float32(1.0 / period)
        if kind == "stripes":
            angle = rng.uniform(0, np.pi)
            t = (xx * np.float32(np.cos(angle)) + yy * np.float32(np.sin(angle))) * inv
            t += np.float32(4096 + rng.uniform(0, 2))  # keep it positive: int cast = floor
            return (t.astype(np.int32) & 1).astype(np.float32)
        oy, ox = rng.uniform(0, period, 2) + 4096
        cells = ((yy + np.float32(oy)) * inv).astype(np.int32) + ((xx + np.float32(ox)) * inv).astype(np.int32)
        return (cells & 1).astype(np.float32)

    def _scene(self, rng):
        h, w = self.size
        short = min(h, w)
        yy, xx = self._yy, self._xx

        # sky above a wavy horizon, ground below
        horizon = np.full(w, rng.uniform(0.25, 0.6) * h, dtype=np.float32)
        for amp in (0.08, 0.03):
            freq = rng.uniform(0.5, 2.5) * 2 * np.pi / w
            horizon += np.float32(rng.uniform(0, amp) * h) * np.sin(freq * xx[0] + rng.uniform(0, 2 * np.pi)).astype(np.float32)
        sky = yy < horizon[None, :]
        label = np.where(sky, SKY, GROUND).astype(np.uint8)

        top, bottom = _sky_colours(rng)
        t = (yy[:, :1] / np.float32(max(horizon.max(), 1.0))).clip(0, 1)  # [H,1]
        gradient = (top + (bottom - top) * t)[:, None, :]  # [H,1,3], constant along rows

        g1, g2 = _ground_colours(rng)
        kind = rng.choice(["stripes", "checker", "speckle"])
        if kind == "speckle":  # random two-colour cells of 1-3 pixels
            c = int(rng.integers(1, 4))
            cells = (rng.random((h // c + 1, w // c + 1)) < 0.5).astype(np.float32)
            mix = cells.repeat(c, axis=0).repeat(c, axis=1)[:h, :w]
        else:
            mix = self._pattern(rng, kind, rng.uniform(3, 9), yy, xx)
        image = np.where(sky[..., None], gradient, g1 + (g2 - g1) * mix[..., None])

        # 1-5 objects, later ones on top; a placement that would hide more than 60 % of an earlier
        # object's visible pixels is redrawn (up to 4 times), so occlusion stays partial
        owner = np.full((h, w), -1, dtype=np.int8)
        visible = []
        for k in range(int(rng.integers(1, 6))):
            cls = int(rng.integers(DISC, RING + 1))
            size = rng.uniform(0.08, 0.35) * short  # square root of the object's area
            for _ in range(4):
                mask = _shape_mask(rng, cls, size, (h, w), horizon)
                hidden = np.bincount(owner[mask] + 1, minlength=k + 1)[1:]
                if all(hidden[i] <= 0.4 * visible[i] for i in range(k)):
                    break
            if not mask.any():
                visible.append(0)
                continue
            behind = image[mask].mean(axis=0)
            colour = _vivid(rng, behind, 90)
            if rng.random() < 0.2:  # two-colour object
                second = _vivid(rng, colour, 70)
                pat = self._pattern(rng, rng.choice(["stripes", "checker"]), rng.uniform(2.5, 6), yy[mask], xx[mask])
                image[mask] = colour + (second - colour) * pat[:, None]
            else:
                image[mask] = colour
            label[mask] = cls
            visible = [v - int(hidden[i]) for i, v in enumerate(visible)] + [int(mask.sum())]
            owner[mask] = k

        sigma = rng.uniform(2, 5)
        image += rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(sigma)
        image += np.float32(0.5)
        return np.clip(image, 0, 255, out=image).astype(np.uint8), label


def _hsv(h, s, v):
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255


def _sky_colours(rng):
    kind = rng.integers(3)
    if kind == 0:  # day: blue overhead, paler at the horizon
        h = rng.uniform(0.54, 0.64)
        return _hsv(h, rng.uniform(0.45, 0.9), rng.uniform(0.55, 0.95)), _hsv(h, rng.uniform(0.05, 0.35), rng.uniform(0.85, 1.0))
    if kind == 1:  # dusk: indigo overhead, orange / pink at the horizon
        return (_hsv(rng.uniform(0.62, 0.78), rng.uniform(0.4, 0.8), rng.uniform(0.25, 0.55)),
                _hsv(rng.uniform(-0.08, 0.1), rng.uniform(0.35, 0.75), rng.uniform(0.8, 1.0)))
    v = rng.uniform(0.45, 0.75)  # overcast grey
    return _hsv(0.6, rng.uniform(0, 0.12), v), _hsv(0.6, rng.uniform(0, 0.08), min(1.0, v + rng.uniform(0.1, 0.3)))


def _ground_colours(rng):
    kind = rng.integers(3)
    h = [rng.uniform(0.2, 0.4), rng.uniform(0.05, 0.12), rng.uniform(0, 1)][kind]  # grass, earth, stone
    s = [rng.uniform(0.35, 0.8), rng.uniform(0.3, 0.7), rng.uniform(0, 0.12)][kind]
    v = rng.uniform(0.3, 0.6)
    return _hsv(h, s, v), _hsv(h + rng.uniform(-0.03, 0.03), s * rng.uniform(0.7, 1.1), min(1.0, v + rng.uniform(0.15, 0.35)))


def _vivid(rng, other, distance, tries=8):
    """A vivid colour (any hue, saturation and value >= 0.5) at least `distance` from `other`."""
    best, best_d = None, -1.0
    for _ in range(tries):
        c = _hsv(rng.uniform(0, 1), rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0))
        d = float(np.linalg.norm(c - other))
        if d >= distance:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _polygon(cx, cy, rx, ry, angle, n):
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(a), ry * np.sin(a)
    ca, sa = np.cos(angle), np.sin(angle)
    return list(zip((cx + x * ca - y * sa).tolist(), (cy + x * sa + y * ca).tolist()))


def _shape_mask(rng, cls, size, size_hw, horizon):
    """A random placement of one shape whose area is size**2 pixels, as a bool [H,W] mask."""
    h, w = size_hw
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    angle = rng.uniform(0, np.pi)
    if cls == DISC:  # ellipse, axes r and r*q: area pi r^2 q
        q = rng.uniform(0.8, 1.0)
        r = size / np.sqrt(np.pi * q)
        cx, cy = _centre(rng, r, size_hw, horizon, "sky" if rng.random() < 0.7 else None)
        draw.polygon(_polygon(cx, cy, r, r * q, angle, 40), fill=1)
    elif cls == BOX:  # rectangle L x Lq, any rotation: area L^2 q
        q = rng.uniform(0.7, 1.0)
        half = size / np.sqrt(q) / 2
        cx, cy = _centre(rng, half * np.sqrt(1 + q * q), size_hw, horizon, "ground" if rng.random() < 0.7 else None)
        angle = rng.uniform(-0.26, 0.26)
        corners = [(-half, -half * q), (half, -half * q), (half, half * q), (-half, half * q)]
        ca, sa = np.cos(angle), np.sin(angle)
        draw.polygon([(cx + x * ca - y * sa, cy + x * sa + y * ca) for x, y in corners], fill=1)
    elif cls == TRIANGLE:  # jittered equilateral, circumradius R: area 3*sqrt(3)/4 R^2
        r = size / np.sqrt(3 * np.sqrt(3) / 4)
        cx, cy = _centre(rng, r, size_hw, horizon, "ground" if rng.random() < 0.7 else None)
        angle = -np.pi / 2 + rng.uniform(-0.26, 0.26)  # pointing up
        a = angle + np.arange(3) * (2 * np.pi / 3) + rng.uniform(-0.15, 0.15, 3)
        rad = r * rng.uniform(0.95, 1.05, 3)
        draw.polygon(list(zip((cx + rad * np.cos(a)).tolist(), (cy + rad * np.sin(a)).tolist())), fill=1)
    else:  # RING: annulus, outer axes r and r*q, hole scaled by k: area pi r^2 q (1 - k^2)
        q, k = rng.uniform(0.75, 1.0), rng.uniform(0.4, 0.6)
        r = size / np.sqrt(np.pi * q * (1 - k * k))
        cx, cy = _centre(rng, r, size_hw)
        draw.polygon(_polygon(cx, cy, r, r * q, angle, 40), fill=1)
        draw.polygon(_polygon(cx, cy, r * k, r * q * k, angle, 40), fill=0)
    return np.asarray(canvas, dtype=bool)


def _centre(rng, radius, size_hw, horizon=None, region=None):
    """A centre that keeps at least about three quarters of a shape of this radius in the image."""
    h, w = size_hw
    m = radius / 2
    cx = rng.uniform(min(m, w / 2), max(w - m, w / 2))
    lo, hi = min(m, h / 2), max(h - m, h / 2)
    if region is not None:
        y = float(horizon[min(int(cx), w - 1)])
        lo, hi = (lo, max(lo, min(hi, y))) if region == "sky" else (min(hi, max(lo, y)), hi)
    return cx, rng.uniform(lo, hi)
