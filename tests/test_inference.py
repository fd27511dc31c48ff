"""The library-level inference API: images in (paths, PIL images, uint8 arrays, lists), label maps at
the image's own size out, under the checkpoint's test protocol; the protocol as a typed value; and the
layering the CLI and the service rely on."""
import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import transeg
from conftest import TINY
from transeg.inference import Segmentation, segment
from transeg.protocol import Protocol

SRC = Path(__file__).parent.parent / "src" / "transeg"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = transeg.create_model("segformer-b0", num_classes=6, classes=list("abcdef"), **TINY).eval()
    m.protocol = Protocol(size_divisor=None)  # whole image at its own size: the reference below is plain
    return m


def _image(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _reference_labels(model, rgb):
    """Normalise by hand, one forward pass, bilinear upsampling to the image, argmax: the whole-image
    protocol written out without the inference module."""
    mean, std = torch.tensor(model.meta["mean"]).view(3, 1, 1), torch.tensor(model.meta["std"]).view(3, 1, 1)
    x = ((torch.from_numpy(rgb).permute(2, 0, 1).float() - mean) / std)[None]
    with torch.no_grad():
        logits = F.interpolate(model(x), size=rgb.shape[:2], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].numpy(), logits.softmax(1)[0].numpy()


def test_predict_takes_paths_pil_images_and_arrays_and_equals_the_written_out_protocol(model, tmp_path):
    rgb = _image(45, 61, 0)  # odd sizes: the label map must come back at exactly 45x61
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    expected, probs = _reference_labels(model, rgb)
    for given in (tmp_path / "photo.png", str(tmp_path / "photo.png"), Image.fromarray(rgb), rgb):
        seg = model.predict(given)
        assert isinstance(seg, Segmentation) and seg.labels.shape == (45, 61) and seg.labels.dtype == np.uint8
        assert (seg.labels == expected).all()
        assert (np.asarray(seg) == expected).all()
    seg = model.predict(rgb, probabilities=True)
    assert seg.probabilities.shape == (6, 45, 61)
    np.testing.assert_allclose(seg.probabilities, probs, atol=1e-5)  # the softmax of the same logits
    np.testing.assert_allclose(seg.confidence, probs.max(0), atol=1e-5)
    assert seg.source is None and model.predict(tmp_path / "photo.png").source == str(tmp_path / "photo.png")


def test_a_list_in_batches_equals_one_at_a_time(model):
    """Images of one size run together (batch_size); a different size starts a new batch; order is kept."""
    images = [_image(32, 40, 1), _image(32, 40, 2), _image(32, 40, 3), _image(48, 56, 4), _image(32, 40, 5)]
    one = [model.predict(im).labels for im in images]
    batched = model.predict(images, batch_size=2)
    assert [s.labels.shape for s in batched] == [(32, 40)] * 3 + [(48, 56), (32, 40)]
    for a, b in zip(one, batched):
        assert (a == b).all()
    assert [s.image is im for s, im in zip(batched, images)] == [True] * 5  # the pixels the model saw, not copies


def test_shares_mask_and_overlay(model):
    seg = Segmentation(labels=np.array([[0, 0, 2], [2, 2, 2]], np.uint8), image=np.zeros((2, 3, 3), np.uint8),
                       classes=list("abc"), palette=[(0, 0, 0), (1, 1, 1), (200, 10, 10)])
    assert seg.shares() == {"c": 4 / 6, "a": 2 / 6}  # present classes only, largest first
    mask = seg.mask()
    assert mask.mode == "P" and np.asarray(mask).tolist() == [[0, 0, 2], [2, 2, 2]]
    assert mask.getpalette()[6:9] == [200, 10, 10]  # class 2's colour travels in the PNG
    assert np.asarray(seg.overlay(alpha=1.0))[1, 0].tolist() == [200, 10, 10]
    with pytest.raises(transeg.TransegError, match="probabilities=True"):
        seg.confidence


def test_isr_for_one_call_leaves_the_model_as_it_was():
    torch.manual_seed(1)
    model = transeg.create_model("edaformer-t", num_classes=4, embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                                 decoder_dim=16).eval()
    rgb = _image(64, 64, 6)
    setting = {"encoder": (2, 2, 1, 1), "decoder": (2, 2, 2)}
    with_isr = model.predict(rgb, isr=setting, probabilities=True).probabilities
    assert model.isr == {"encoder": (1, 1, 1, 1), "decoder": (1, 1, 1)}
    model.set_isr(**setting)
    np.testing.assert_array_equal(with_isr, model.predict(rgb, probabilities=True).probabilities)
    model.set_isr()
    # ISR pools keys/values harder: the scores change (so the setting was in effect during the call)
    assert np.abs(with_isr - model.predict(rgb, probabilities=True).probabilities).max() > 1e-4


@pytest.mark.parametrize("bad,message", [
    (np.zeros((8, 8, 3), np.float32), "HxWx3 uint8"),
    (np.zeros((8, 8), np.uint8), "HxWx3 uint8"),
    ({"image": 1}, "cannot segment a dict"),
    ("/nonexistent/photo.jpg", "/nonexistent/photo.jpg: cannot read the image"),
])
def test_bad_inputs_get_one_line(model, bad, message):
    with pytest.raises(transeg.TransegError, match=message):
        model.predict(bad)


def test_segment_is_lazy(model):
    """`segment` reads an input only when its result is asked for (a folder of thousands of images is
    never held in memory at once): the second, unreadable input fails only at the second result."""
    results = segment(model, [_image(32, 32, 7), "/nonexistent.png"])
    assert next(results).labels.shape == (32, 32)
    with pytest.raises(transeg.TransegError, match="nonexistent.png"):
        next(results)


def test_tensor_batches_keep_their_meaning(model):
    """A normalised tensor batch still gives the label-map tensor [N,H,W] (the pre-image API)."""
    x = torch.randn(2, 3, 33, 47)
    labels = model.predict(x)
    assert labels.shape == (2, 33, 47)
    with torch.no_grad():
        assert torch.equal(labels, F.interpolate(model(x), size=(33, 47), mode="bilinear").argmax(1))


# --------------------------------------------------------------------------------------------- protocol
def test_protocol_round_trips_through_a_checkpoint(model, tmp_path):
    p = Protocol(mode="slide", crop=(64, 64), stride=(48, 48), scale=(2048, 512), size_divisor=None,
                 min_short_side=64, ms_scales=(0.75, 1.0, 1.25))
    model.protocol = p
    transeg.save(model, tmp_path / "m.safetensors")
    assert transeg.load(tmp_path / "m.safetensors").protocol == p
    model.protocol = Protocol(size_divisor=None)


def test_old_checkpoints_protocol_still_loads(model, tmp_path):
    """Files written before the protocol was typed hold a dict with lists, an `ms` entry, and (Segmenter
    conversions) a `dataset` note; they read as the same protocol."""
    transeg.save(model, tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["transeg"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta["test"] = dict(mode="slide", scale=[2048, 512], size_divisor=None, crop=[512, 512], stride=[480, 480],
                        scales=[1.0], flip=False, min_short_side=512, dataset="ade20k",
                        ms=dict(scales=[0.5, 1.0], flip=False))
    save_file(state, tmp_path / "old.safetensors", metadata={"format": "transeg", "transeg": json.dumps(meta)})
    p = transeg.load(tmp_path / "old.safetensors").protocol
    assert p == Protocol(mode="slide", crop=(512, 512), stride=(480, 480), scale=(2048, 512), size_divisor=None,
                         min_short_side=512, ms_scales=(0.5, 1.0), ms_flip=False)
    assert p.multi_scale().scales == (0.5, 1.0) and p.multi_scale().flip is False
    # no stored protocol (the earliest files): whole image, aligned to 32, mmseg's ratios for --ms
    assert Protocol.from_meta(None) == Protocol() and Protocol().multi_scale().scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@pytest.mark.parametrize("fields,message", [
    (dict(mode="slide"), "needs a crop and a stride"),
    (dict(mode="tiles"), "mode must be 'whole' or 'slide'"),
    (dict(crop=(0, 32)), "two positive sizes"),
    (dict(scales=()), "positive ratios"),
])
def test_protocol_refuses_what_cannot_run(fields, message):
    with pytest.raises(transeg.TransegError, match=message):
        Protocol(**fields)


# --------------------------------------------------------------------------------------------- layering
def _imports(path):
    """Module names imported by a file, relative ones resolved against the transeg package."""
    tree = ast.parse(path.read_text())
    package = ".".join(("transeg",) + path.relative_to(SRC).parent.parts)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
    return names


def test_the_cli_holds_no_model_code():
    """cli.py parses, calls the library and prints: it imports no model class (backbones, heads, layers,
    families, Segmentor) and no inference internals, only library entry points."""
    banned = ("transeg.backbones", "transeg.heads", "transeg.layers", "transeg.segmentor", "transeg.losses",
              "transeg.families", "transeg.inference.normalised_scores", "transeg.inference.scores", "transeg.data.transforms")
    found = sorted(n for n in _imports(SRC / "cli.py") if n.startswith(banned))
    assert found == []


# --------------------------------------------------------------------------------------------- memory bound
def _tiny_model(name, num_classes):
    from transeg.registry import FAMILIES, VARIANTS

    variant = VARIANTS[name]
    torch.manual_seed(0)
    return transeg.create_model(name, num_classes=num_classes, **FAMILIES[variant.family].tiny(variant.arguments())).eval()


@pytest.mark.parametrize("per_block", [1, 3])
@pytest.mark.parametrize("name", ["segformer-b0", "eomt-dinov2-l16", "semask-swin-l-mask2former"])
def test_labels_a_class_at_a_time_equal_the_full_argmax(name, per_block):
    """`inference.labels` upsamples 1 (or 3: 13 blocks of 3, then 1) classes' planes at a time here and keeps a
    running maximum: its labels equal the argmax of all 40 classes upsampled at once (NCHW) on every one of
    the 2 x 97 x 131 pixels (0 differ: each plane is upsampled exactly as in the full call; ties keep the first
    class), for a logit head with channels-last scores (SegFormer) and two mask-classification heads
    (probabilities); the confidence equals the full scores' softmax (or score) maximum to 1e-6. With all 40
    in one block, the labels are those of the full-size scores as they come (`inference.scores`)."""
    from transeg import inference

    model = _tiny_model(name, 40)
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 97, 131), dtype=np.uint8))
    protocol = Protocol(scale=(256, 64))  # runs at 64 x 86: the upsampling factor is not an integer
    with torch.no_grad():
        s = inference.normalised_scores(model, inference.prepare(model, images, protocol), protocol)
        full = F.interpolate(s.contiguous(), size=(97, 131), mode="bilinear", align_corners=False)
        full = full if model.outputs_probabilities else full.softmax(1)
        found, confidence = inference.labels(model, images, protocol, confidence=True,
                                             block_bytes=per_block * 4 * 2 * 97 * 131)
        whole, _ = inference.labels(model, images, protocol)
        as_they_come = inference.scores(model, images, protocol)
    assert found.shape == (2, 97, 131)
    assert int((found != full.argmax(1)).sum()) == 0
    assert (confidence - full.max(1).values).abs().max().item() < 1e-6
    assert torch.equal(whole, as_they_come.argmax(1))


def test_predict_memory_does_not_grow_with_the_class_count():
    """A 2000 x 1500 image on a 150-class model: the full-size scores would be 150 x 3 MP x 4 B = 1.8 GB; the
    label map and confidence are made within 64 MiB blocks of upsampled scores (SCORE_BLOCK_BYTES is 256 MiB;
    64 here to show the bound follows it) plus about 45 bytes per output pixel (0.14 GB here), so the peak of
    the tensors allocated stays under 0.25 GB. With 20 classes it is within 35 MB of that: only the scores at
    the size the model ran at grow with K (with their NCHW copy, 2 x 150 x 128 x 192 x 4 B = 29.5 MB)."""
    from transeg import inference
    from transeg.bench import peak_tensor_memory

    image = np.random.default_rng(2).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)
    peaks = {}
    for k in (20, 150):
        model = _tiny_model("segformer-b0", k)
        model.protocol = Protocol(scale=(512, 128))
        with torch.no_grad():
            peaks[k] = peak_tensor_memory(lambda: next(inference.segment(model, [image], confidence=True,
                                                                         block_bytes=64 * 2**20)))
    assert 4 * 150 * 1500 * 2000 > 1.7e9  # what the old path allocated for K = 150
    assert max(peaks.values()) < 0.25e9, peaks
    assert abs(peaks[150] - peaks[20]) < 35e6, peaks
    assert inference.SCORE_BLOCK_BYTES == 256 * 2**20


def test_full_size_probabilities_are_refused_above_the_limit_before_any_work():
    """probabilities=True asks for K x H x W floats at the image's size: 150 classes on 8000 x 6000 would be
    28.6 GiB, above MAX_SCORE_BYTES (2 GiB): one line saying what to ask for instead, before the model runs."""
    from transeg.errors import TransegError

    model = _tiny_model("segformer-b0", 150)
    image = np.zeros((6000, 8000, 3), dtype=np.uint8)
    with pytest.raises(TransegError, match=r"need 26\.8 GiB .*above the 2\.0 GiB limit: ask for labels and confidence"):
        model.predict(image, probabilities=True)
    seg = model.predict(np.zeros((60, 80, 3), dtype=np.uint8), probabilities=True)  # small: allowed
    assert seg.probabilities.shape == (150, 60, 80)


_API_MISTAKES = [
    ("an empty image", lambda m: m.predict(np.zeros((0, 0, 3), np.uint8)), r"0x0 \(WxH\) has no pixels"),
    ("a 0-pixel-high image", lambda m: m.predict(np.zeros((0, 9, 3), np.uint8)), r"9x0 \(WxH\) has no pixels"),
    ("an unknown ISR key", lambda m: m.predict(np.zeros((32, 32, 3), np.uint8), isr={"encdoer": (2, 2, 1, 1)}),
     "'encdoer' is not an ISR setting"),
    ("an ISR setting that is not a dict", lambda m: m.predict(np.zeros((32, 32, 3), np.uint8), isr=(2, 2, 1, 1)),
     r"\(2, 2, 1, 1\) is not an ISR setting"),
    ("0 classes", lambda m: transeg.create_model("segformer-b0", num_classes=0), "num_classes must be a whole number"),
    ("-3 classes", lambda m: transeg.create_model("segformer-b0", num_classes=-3), "got -3"),
    ("2.5 classes", lambda m: transeg.create_model("segformer-b0", num_classes=2.5), "got 2.5"),
    ("True classes", lambda m: transeg.create_model("segformer-b0", num_classes=True), "got True"),
    ("batch_size 0", lambda m: m.predict([np.zeros((32, 32, 3), np.uint8)], batch_size=0), "batch_size must be"),
    ("batch_size -1", lambda m: m.predict([np.zeros((32, 32, 3), np.uint8)] * 2, batch_size=-1), "got -1"),
    ("a uint8 tensor as a normalised batch", lambda m: m.predict(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)),
     "floating point, got torch.uint8"),
    ("a [3,H,W] tensor", lambda m: m.predict(torch.zeros(3, 32, 32)), r"\[N,3,H,W\] .* got \[3, 32, 32\]"),
    ("a 4-channel batch", lambda m: m.predict(torch.zeros(1, 4, 32, 32)), r"got \[1, 4, 32, 32\]"),
]


@pytest.mark.parametrize("mistake,call,message", _API_MISTAKES, ids=[m[0] for m in _API_MISTAKES])
def test_python_api_mistakes_are_one_line(model, mistake, call, message):
    """Each mistake a caller of the Python API can make gets a TransegError of one line that says what was given
    (before: tracebacks from torch, or silent labels from uint8 pixels taken as normalised values); the model is
    left as it was (its ISR setting and weights unchanged)."""
    from transeg.errors import TransegError

    before = {k: v.clone() for k, v in model.state_dict().items()}
    isr_before = model.isr
    with pytest.raises(TransegError, match=message) as e:
        call(model)
    assert "\n" not in str(e.value)
    assert model.isr == isr_before and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
