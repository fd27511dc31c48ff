"""transeg.checkpoint: our .safetensors format (save/load, NaN weights, metadata checks) and safe loading of .pth files."""
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import transeg
from conftest import TINY
from helpers import _error, _one_line
from transeg.cli import main


def _nan_ckpt(tmp_path, tiny_ckpt):
    path = tmp_path / "nan.safetensors"
    state = load_file(str(tiny_ckpt))
    state["decode_head.linear_pred.weight"][1, 2] = float("nan")
    with safe_open(str(tiny_ckpt), framework="pt") as f:
        save_file(state, str(path), metadata=f.metadata())
    return path


@pytest.mark.parametrize("verb", ["eval", "predict", "load"])
def test_nan_weights_are_refused(tmp_path, capsys, tiny_ckpt, verb):
    """A checkpoint with one NaN weight evaluated to "mIoU 7.93" and exported with "max |diff| 0.0"; now
    every reader refuses it with one line naming the file and the tensor."""
    path = _nan_ckpt(tmp_path, tiny_ckpt)
    message = "nan.safetensors: tensor decode_head.linear_pred.weight holds 1 NaN/inf value(s)"
    if verb == "load":
        with pytest.raises(transeg.TransegError, match=message.replace("(", r"\(").replace(")", r"\)")):
            transeg.load(path)
        return
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    argv = {"eval": ["eval", str(path), "--data", "synthetic:size=32,n=2", "--limit", "1"],
            "predict": ["predict", str(path), str(image), "--out", str(tmp_path / "o")]}[verb]
    assert main(argv) == 2
    _one_line(capsys, message)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written


def test_a_model_with_nan_weights_is_not_saved(tmp_path):
    model = transeg.create_model("segformer-b0", num_classes=3, **TINY)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(transeg.TransegError, match=r"bad.safetensors: not saved: tensor .* holds 1 NaN/inf"):
        transeg.save(model, tmp_path / "bad.safetensors")
    assert not list(tmp_path.iterdir())


def _with_metadata(tiny_ckpt, tmp_path, edit):
    """A copy of the tiny checkpoint whose transeg metadata is `edit(dict)` (a dict, or a raw string)."""
    with safe_open(str(tiny_ckpt), framework="pt") as f:
        meta = f.metadata()
    value = edit(json.loads(meta["transeg"]))
    path = tmp_path / "edited.safetensors"
    save_file(load_file(str(tiny_ckpt)), str(path),
              metadata={**meta, "transeg": value if isinstance(value, str) else json.dumps(value)})
    return path


def _set(key, value):
    return lambda m: {**m, key: value}


def _args(**changes):
    return lambda m: {**m, "model_args": {**m["model_args"], **changes}}


BAD_METADATA = [
    ("not JSON", lambda m: '{"variant": "segformer-b0", ', "bad transeg metadata: not JSON"),
    ("a JSON list", lambda m: [m], "bad transeg metadata: expected a JSON object, got list"),
    ("no variant", lambda m: {k: v for k, v in m.items() if k != "variant"}, "bad transeg metadata: no 'variant'"),
    ("unknown variant", _set("variant", "segformer-b9"), "unknown model 'segformer-b9'"),
    ("palette entry", _set("palette", [[0, 0, 0], [0, 0], [1, 1, 1]]),
     "'palette' entry 1 must be [r, g, b] (3 whole numbers), got [0, 0]"),
    ("palette of names", _set("palette", "red, green, blue"), "'palette' must be a list of 3 [r, g, b] colours"),
    ("palette too short", _set("palette", [[0, 0, 0]]), "'palette' must be a list of 3 [r, g, b] colours"),
    ("classes", _set("classes", "abc"), "'classes' must be a list of 3 class names"),
    ("mean", _set("mean", [1, 2]), "'mean' must be 3 numbers"),
    ("model_args a list", _set("model_args", [1, 2]), "'model_args' must be an object"),
    ("unknown argument", _args(colour="red"), "model_args do not fit segformer-b0: unknown argument(s) ['colour']"),
    ("argument of the wrong type", _args(embed_dims="wide"), "model_args do not fit segformer-b0 ("),
    ("huge embed_dims", _args(embed_dims=[10**8, 16, 24, 32]),
     "its metadata describes a segformer-b0 of at least 14,700,000,000 weights but the file holds 53,500"),
    ("embed_dims that do not fit", _args(embed_dims=[8, 16, 24, 40]),
     "its metadata describes a segformer-b0 that does not fit the file's tensors (23 misshapen: "
     "backbone.patch_embed4.proj.weight (32, 24, 3, 3) vs (40, 24, 3, 3)"),
    ("a billion layers", _args(depths=[10**9, 1, 1, 1]), "depths=[1000000000, 1, 1, 1] asks for more layers than"),
    ("test protocol", _set("test", {"mode": "zigzag"}), "test protocol: mode must be 'whole' or 'slide'"),
]


@pytest.mark.parametrize("case,edit,message", BAD_METADATA, ids=[c[0] for c in BAD_METADATA])
def test_damaged_checkpoint_metadata_is_one_line_naming_the_file(tmp_path, capsys, tiny_ckpt, case, edit, message):
    """Metadata a file cannot be rebuilt from gave tracebacks (JSONDecodeError, KeyError, TypeError from
    a constructor) or, for huge sizes, tried to allocate terabytes (59 GB for the first tensor here);
    now one line naming the file, from its header and a build stopped before it allocates more than
    the file holds; the file is unchanged."""
    path = _with_metadata(tiny_ckpt, tmp_path, edit)
    before = path.read_bytes()
    started = time.perf_counter()
    assert main(["eval", str(path)]) == 2
    line = _one_line(capsys, message)
    assert line.startswith(f"transeg: error: {path}: ")
    assert path.read_bytes() == before and time.perf_counter() - started < 20


# a foreign file that is no checkpoint: torch's unpickler fails on garbage in any way (KeyError on a text
# file, UnpicklingError whose text advises weights_only=False on random bytes); each is one line that does
# not blame code execution and gives no such advice
@pytest.mark.parametrize("content,message", [
    (b"hello world, this is a text file\n", "not a PyTorch checkpoint (its bytes do not unpickle"),
    (bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8)), "not a PyTorch checkpoint (its bytes"),
    (b"PK\x03\x04garbage", "not a readable PyTorch checkpoint (PytorchStreamReader failed reading zip archive"),
])
def test_convert_of_a_file_that_is_no_checkpoint_is_one_line(tmp_path, capsys, content, message):
    src = tmp_path / "b0.pth"
    src.write_bytes(content)
    line = _error(capsys, main(["convert", str(src), str(tmp_path / "b0.safetensors"), "--from", "segformer"]))
    assert f"{src}: {message}" in line and "would run code" not in line and "weights_only` set to `False" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b0.pth"]


class _Payload:
    """Unpickling this runs a shell command: what a booby-trapped .pth does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path, capsys):
    """A .pth whose pickle calls os.system: `transeg convert` and `backbone_weights` refuse it with one
    line naming the file and the global it wanted, the command never runs, nothing is written."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"decode_head.conv_seg.weight": _Payload(marker)}}, evil)
    assert main(["convert", str(evil), str(tmp_path / "out.safetensors"), "--from", "segformer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "evil.pth: refused: loading it would run code" in err[0] and "system" in err[0]
    from transeg.convert import load_backbone_weights

    with pytest.raises(transeg.TransegError, match="evil.pth: refused: loading it would run code"):
        load_backbone_weights(transeg.create_model("segformer-b0", num_classes=3, **TINY), evil)
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()
    # the same file unpickled naively would have run the command (so the test checks something real)
    with open(evil, "rb") as f:
        torch.load(f, weights_only=False)
    assert marker.exists()

