"""transeg.inference and transeg.protocol under Segmentor.predict / `transeg predict`: images and scales it cannot run."""
import pytest

import transeg
from helpers import _error, _png
from transeg.cli import main
from transeg.protocol import Protocol


@pytest.mark.parametrize("h,w,extra,message", [
    (10, 10000, [], "10000x10 (WxH) is too thin for this model: its test protocol (whole, resize keep-ratio to "
                    "(128, 32), align 32, scales [1.0]) makes it 128x0; crop or pad it"),
    (600, 1, [], "1x600 (WxH) is too thin for this model: its test protocol"),
    (32, 32, ["--scales", "0.01"], "32x32 (WxH) is too small for this model: scale 0.01 of its test protocol makes "
                                   "it 0x0; use larger scales"),
    # the protocol keeps 32x32, but ISR pools stage 1's keys/values 16x: its 8x8 map is smaller than the window
    (32, 32, ["--isr-encoder", "2,2,1,1"], "32x32 (WxH) is too small for this model with its ISR setting: it runs "
                                           "at 32x32"),
])
def test_an_image_too_small_or_thin_for_the_model_is_one_line(ckpt, tmp_path, capsys, h, w, extra, message):
    image = _png(tmp_path / "x.png", h=h, w=w)
    line = _error(capsys, main(["predict", str(ckpt), str(image), "--out", str(tmp_path / "o"), *extra]))
    assert f"x.png: {message}" in line


@pytest.mark.parametrize("scales", ["0", "-1", "nan", "inf", "1,nan"])
def test_scales_must_be_positive_and_finite(ckpt, tmp_path, capsys, scales):
    """nan passed `min(scales) <= 0` (a comparison with nan is False) and failed deep inside."""
    image = _png(tmp_path / "x.png")
    line = _error(capsys, main(["predict", str(ckpt), str(image), "--out", str(tmp_path / "o"), f"--scales={scales}"]))
    assert "test protocol: scales must be positive ratios (finite, > 0)" in line
    with pytest.raises(transeg.TransegError, match="positive ratios"):
        Protocol(scales=[float(s) for s in scales.split(",")])

