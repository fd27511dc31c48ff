"""EDAFormer: structure, parameter counts, GFLOPs (with and without ISR) and logits against the authors' code."""
import json
from pathlib import Path

import pytest
import torch

import transeg
from seeded import sample_positions, seeded_input, seeded_state_dict
from transeg.convert import convert
from transeg.flops import count_gmacs, count_params, meta_model

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "edaformer_official.json").read_text())
CONV_SEG = 128 * 150 + 150  # the authors' unused 128->K conv_seg at 150 classes (in the authors' released checkpoints)
ISR = dict(encoder=(2, 2, 1, 1), decoder=(2, 2, 2))  # the paper's optimal setting (README example)


@pytest.mark.parametrize("b,official,paper_m", [("t", 4_949_264, 4.9), ("b", 29_457_516, 29.4)])
def test_params_equal_the_authors_model(b, official, paper_m):
    """Counted by running the authors' code: T 4,949,264 and B 29,457,516 with 150 classes including conv_seg; paper 4.9M / 29.4M."""
    n = count_params(meta_model(f"edaformer-{b}", 150))
    assert n + CONV_SEG == official
    assert n == {"t": 4_929_914, "b": 29_438_166}[b]
    assert round(n / 1e6, 1) == paper_m


def test_state_dict_matches_the_authors_keys_and_shapes():
    for variant, keys in FIXTURE["keys"].items():
        k = 150 if variant == "edaformer-t" else 19
        ours = {n: list(t.shape) for n, t in meta_model(variant, k).state_dict().items()}
        theirs = {n: s for n, s in keys if not n.startswith("decode_head.conv_seg.")}
        assert ours == theirs


# The authors' tools/get_flops.py, run on their model: encoder x decoder ISR
# multipliers -> GFLOPs at ADE 512x512 (150 classes) and Cityscapes 1024x2048 (19 classes).
GFLOPS = [
    ("t", (512, 512), 150, (1, 1, 1, 1), (1, 1, 1), 5.62), ("t", (512, 512), 150, (2, 2, 1, 1), (2, 2, 2), 4.70),
    ("b", (512, 512), 150, (1, 1, 1, 1), (1, 1, 1), 31.93), ("b", (512, 512), 150, (2, 2, 1, 1), (2, 2, 2), 29.37),
    ("t", (1024, 2048), 19, (1, 1, 1, 1), (1, 1, 1), 151.54), ("t", (1024, 2048), 19, (2, 2, 1, 1), (2, 2, 2), 94.79),
    ("b", (1024, 2048), 19, (1, 1, 1, 1), (1, 1, 1), 605.39), ("b", (1024, 2048), 19, (2, 2, 1, 1), (2, 2, 2), 452.46),
    ("t", (1024, 2048), 19, (2, 1, 1, 1), (1, 1, 1), 125.77), ("t", (1024, 2048), 19, (1, 1, 1, 1), (2, 2, 2), 133.46),
    ("t", (1024, 2048), 19, (4, 4, 2, 1), (2, 2, 2), 52.66), ("b", (1024, 2048), 19, (4, 4, 2, 1), (2, 2, 2), 279.49),
    ("t", (1024, 1024), 19, (8, 4, 2, 1), (2, 2, 2), 19.89), ("t", (512, 512), 171, (1, 1, 1, 1), (1, 1, 1), 5.635),
]


@pytest.mark.parametrize("b,size,k,enc,dec,official", GFLOPS)
def test_gflops_in_the_authors_convention(b, size, k, enc, dec, official):
    model = meta_model(f"edaformer-{b}", k).set_isr(enc, dec)
    digits = len(str(official).split(".")[1])
    assert round(count_gmacs(model, size)["total"], digits) == official


def test_isr_savings_are_the_papers():
    """Paper (seed article): ISR 2211/222 cuts T's GFLOPs by 37.4% on Cityscapes and 16.1% on ADE20K
    (5.6 -> 4.7 at the paper's one decimal), B's by 25.3% on Cityscapes."""
    def gflops(b, size, k, **isr):
        return count_gmacs(meta_model(f"edaformer-{b}", k).set_isr(**isr), size)["total"]

    for b, paper in (("t", -37.4), ("b", -25.3)):
        assert round(100 * (gflops(b, (1024, 2048), 19, **ISR) / gflops(b, (1024, 2048), 19) - 1), 1) == paper
    base, isr = round(gflops("t", (512, 512), 150), 1), round(gflops("t", (512, 512), 150, **ISR), 1)
    assert (base, isr) == (5.6, 4.7) and round(100 * (isr / base - 1), 1) == -16.1


def _official_pth(case, path):
    keys = FIXTURE["keys"][case["variant"]]
    state = seeded_state_dict(keys, case["weight_seed"])
    k = case["num_classes"]
    torch.save({"meta": {"CLASSES": tuple(f"c{i}" for i in range(k)), "PALETTE": [[i, i, i] for i in range(k)]},
                "state_dict": state}, path)


def _case_id(c):
    isr = "isr" + "".join(map(str, c["isr_encoder"] + c["isr_decoder"]))
    return f"{c['variant']}-{'x'.join(map(str, c['input_shape']))}-{isr}"


@pytest.mark.parametrize("index", range(len(FIXTURE["cases"])), ids=[_case_id(c) for c in FIXTURE["cases"]])
def test_logits_equal_the_authors_code(index, tmp_path):
    """Converted seeded weights give the authors' logits to 1e-4, with and without ISR, at 512x512 and
    at an odd size whose maps do not divide by the pooling (floor pooling drops the last rows)."""
    case = FIXTURE["cases"][index]
    _official_pth(case, tmp_path / "official.pth")
    model = convert(tmp_path / "official.pth", "edaformer")
    assert model.meta["variant"] == case["variant"] and model.meta["classes"][2] == "c2"
    model.set_isr(encoder=case["isr_encoder"], decoder=case["isr_decoder"])
    with torch.no_grad():
        logits = model(seeded_input(case["input_shape"], case["input_seed"]))
    assert list(logits.shape) == case["logits_shape"]
    idx = sample_positions(logits.shape, len(case["sample_index"]), case["sample_seed"])
    assert idx.tolist() == case["sample_index"]
    expected = torch.tensor(case["sample_values"])
    assert (logits.flatten()[idx] - expected).abs().max().item() <= 1e-4


def test_isr_changes_the_output_more_than_the_tolerance():
    """So the ISR parity cases can fail: the same weights with and without ISR differ well beyond 1e-4."""
    by_input = {}
    for c in FIXTURE["cases"]:
        by_input.setdefault((c["variant"], tuple(c["input_shape"])), []).append(torch.tensor(c["sample_values"]))
    for plain, isr in by_input.values():
        assert (plain - isr).abs().max().item() > 1e-2


def test_set_isr_is_a_complete_validated_setting():
    model = meta_model("edaformer-t", 150)
    assert model.isr == {"encoder": (1, 1, 1, 1), "decoder": (1, 1, 1)}
    model.set_isr(**ISR)
    assert model.isr == {"encoder": (2, 2, 1, 1), "decoder": (2, 2, 2)}
    # pooling = trained ratio x ISR: encoder (8,4,2,1) -> (16,8,2,1); decoder c2,c3,c4 (4,2,1) -> (8,4,2)
    assert transeg.isr.effective_pooling(model) == {"encoder": (16, 8, 2, 1), "decoder": (8, 4, 2)}
    assert model.decode_head.attn444.attn.pool.effective == 2 and model.decode_head.attn2.attn.pool.effective == 8
    model.set_isr(encoder=(4, 2, 1, 1))  # a part not given goes back to 1
    assert model.isr == {"encoder": (4, 2, 1, 1), "decoder": (1, 1, 1)}
    with pytest.raises(transeg.TransegError, match=r"ISR decoder needs 3 ratios \(one per decoder branch\), got 2"):
        model.set_isr(encoder=(2, 2, 2, 2), decoder=(2, 2))
    with pytest.raises(transeg.TransegError, match="positive integers"):
        model.set_isr(encoder=(2, 0, 1, 1))
    assert model.isr["encoder"] == (4, 2, 1, 1)  # a refused setting changed nothing
    model.set_isr()
    assert model.isr == {"encoder": (1, 1, 1, 1), "decoder": (1, 1, 1)}
    assert model.state_dict().keys() == meta_model("edaformer-t", 150).state_dict().keys()


def test_pooling_wider_than_the_map_becomes_global():
    """At a tiny input, stage 1 (8x8 map at 32x32) pooled by 8 x 4 = 32 would leave no K/V in the authors'
    code; here the window is clipped, giving the map's mean as the single key/value token."""
    from transeg.layers import KeyValuePool

    pool = KeyValuePool(8)
    pool.isr = 4
    x = torch.randn(2, 5, 8, 6)
    assert torch.allclose(pool(x), x.mean(dim=(2, 3), keepdim=True), atol=1e-6)
    model = transeg.create_model("edaformer-t", num_classes=3).eval().set_isr(encoder=(4, 4, 4, 4))
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3, 4, 4)


def test_segformer_gets_isr_as_pooling_before_its_strided_conv():
    """ISR for SegFormer (EDAFormer Table 7): average-pool by r, then the trained strided conv + norm."""
    from transeg.layers import SpatialReductionAttention

    torch.manual_seed(0)
    attn = SpatialReductionAttention(16, 2, sr_ratio=2).eval()
    x, hw = torch.randn(1, 12 * 8, 16), (12, 8)
    attn.pool.isr = 3
    reduced = attn.sr(torch.nn.functional.avg_pool2d(x.transpose(1, 2).reshape(1, 16, 12, 8), 3))  # 4x2 -> 2x1
    kv = attn.kv(attn.norm(reduced.flatten(2).transpose(1, 2))).reshape(1, -1, 2, 2, 8).permute(2, 0, 3, 1, 4)
    q = attn.q(x).reshape(1, -1, 2, 8).transpose(1, 2)
    expected = attn.proj((torch.softmax(q @ kv[0].transpose(-1, -2) / 8 ** 0.5, -1) @ kv[1]).transpose(1, 2).reshape(1, -1, 16))
    assert torch.allclose(attn(x, hw), expected, atol=1e-6)

    model = meta_model("segformer-b0", 150)
    assert model.isr == {"encoder": (1, 1, 1, 1), "decoder": ()}
    # 8.40 GFLOPs trained; pooling stage 1-2 twice as hard costs 7.75 (the pools' inputs counted as mmcv would)
    assert round(count_gmacs(model.set_isr(encoder=(2, 2, 1, 1)), (512, 512))["total"], 2) == 7.75
    with pytest.raises(transeg.TransegError, match="segformer-b0: its decode head has no attention that pools"):
        model.set_isr(encoder=(2, 2, 1, 1), decoder=(2, 2, 2))


def test_models_without_pooled_attention_refuse_isr():
    from transeg.isr import parse_ratios
    from transeg.segmentor import Segmentor

    plain = Segmentor(torch.nn.Identity(), torch.nn.Identity(), 2)
    plain.set_isr(encoder=(1, 1))  # all-ones is a no-op everywhere
    with pytest.raises(transeg.TransegError, match="Identity: its backbone has no attention that pools"):
        plain.set_isr(encoder=(2,))
    assert parse_ratios("2,2,1,1") == (2, 2, 1, 1) and parse_ratios("16") == (16,)
    with pytest.raises(transeg.TransegError, match="comma-separated, e.g. 2,2,1,1"):
        parse_ratios("2211")


def test_convert_refuses_an_imagenet_backbone(tmp_path):
    keys = [(k.removeprefix("backbone."), s) for k, s in FIXTURE["keys"]["edaformer-t"] if k.startswith("backbone.")]
    torch.save(seeded_state_dict(keys + [("head.weight", [1000, 256]), ("head.bias", [1000])], 0), tmp_path / "EFT_T.pth")
    with pytest.raises(transeg.TransegError, match="EFT_T.pth: holds no decode head"):
        convert(tmp_path / "EFT_T.pth", "edaformer")


def test_classifier_head_for_imagenet_pretraining():
    from transeg.families.edaformer.encoder import EmbeddingFreeTransformer

    enc = EmbeddingFreeTransformer(embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    assert enc.classify(x).shape == (2, 10)
    assert torch.allclose(enc.classify(x), enc.head(enc(x)[-1].mean(dim=(2, 3))))
    assert "head.weight" in enc.state_dict()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import TINY_DATA, TINY_EDAFORMER
    from transeg.cli import main

    out = tmp_path_factory.mktemp("eda")
    assert main(["train", "--model", "edaformer-t", "--data", TINY_DATA, "--out", str(out), "--iters", "4",
                 "--batch-size", "2", "--device", "cpu", "--set", f"model_args={json.dumps(TINY_EDAFORMER)}",
                 "eval_interval=4", "ckpt_interval=4", "warmup_iters=0"]) == 0
    return out


def test_cli_eval_and_predict_take_isr(tiny_run, capsys, tmp_path):
    from PIL import Image

    from transeg.cli import main

    ckpt = str(tiny_run / "model.safetensors")
    assert main(["eval", ckpt, "--limit", "4", "--isr-encoder", "2,2,1,1", "--isr-decoder", "2,2,2"]) == 0
    assert "scales [1.0], ISR encoder 2,2,1,1 / decoder 2,2,2" in capsys.readouterr().out
    Image.new("RGB", (45, 37), (90, 20, 200)).save(tmp_path / "x.png")
    assert main(["predict", ckpt, str(tmp_path / "x.png"), "--out", str(tmp_path / "p"), "--isr-encoder", "4,4,2,1"]) == 0
    # decoder not given -> 1; K/V reductions: encoder (8,4,2,1) x (4,4,2,1), decoder as trained (4,2,1)
    assert "ISR encoder 4,4,2,1 / decoder 1,1,1 (K/V pooling encoder 32,16,4,1; decoder 4,2,1)" in capsys.readouterr().out
    assert (tmp_path / "p" / "x_mask.png").is_file()
    assert main(["eval", ckpt, "--isr-decoder", "2,2"]) == 2
    assert "edaformer-t: ISR decoder needs 3 ratios (one per decoder branch), got 2: 2,2" in capsys.readouterr().err


def test_cli_isr_sweep_prints_plots_and_scores(tiny_run, capsys, tmp_path):
    from transeg.cli import main

    plot = tmp_path / "sweep.png"
    assert main(["bench", str(tiny_run / "model.safetensors"), "--size", "64x64", "--runs", "1", "--warmup", "0",
                 "--isr-sweep", "--data", "synthetic:size=32,n=16", "--limit", "4", "--plot", str(plot)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "GFLOPs" in line]
    assert len(lines) == 10  # the ten encoder/decoder settings of isr.SWEEP
    assert lines[0].startswith("no ISR") and "( +0.0%)" in lines[0] and "mIoU" in lines[0]
    assert lines[4].startswith("ISR encoder 2,2,1,1 / decoder 2,2,2")
    assert plot.is_file()


def test_imagenet_encoder_weights_initialise_the_backbone(tmp_path):
    """The paper fine-tunes from ImageNet EFT weights (`EFT_T.pth`: the encoder's own names + a 1000-way
    `head`): `backbone_weights` / load_backbone_weights puts them in the segmentor's backbone."""
    from conftest import TINY_EDAFORMER
    from transeg.families.edaformer.encoder import EmbeddingFreeTransformer
    from transeg.convert import load_backbone_weights

    dims = TINY_EDAFORMER["embed_dims"]
    imagenet = EmbeddingFreeTransformer(embed_dims=dims, depths=(1, 1, 1, 1), mlp_ratios=(2,) * 4, num_classes=1000)
    torch.save({"model": imagenet.state_dict()}, tmp_path / "EFT_tiny.pth")
    model = transeg.create_model("edaformer-t", num_classes=3, **TINY_EDAFORMER)
    load_backbone_weights(model, tmp_path / "EFT_tiny.pth")
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, imagenet.state_dict()[k])
    other = transeg.create_model("edaformer-t", num_classes=3)
    with pytest.raises(transeg.TransegError, match=r"EFT_tiny.pth: does not fit the edaformer-t backbone; .*misshapen"):
        load_backbone_weights(other, tmp_path / "EFT_tiny.pth")


def test_models_lists_edaformer(capsys):
    from transeg.cli import main

    assert main(["models", "--family", "edaformer"]) == 0
    rows = {line.split()[0]: line.split()[1:6] for line in capsys.readouterr().out.splitlines()[1:3]}
    # measured params (M) and GFLOPs at 512x512 beside the paper's 4.9 / 29.4 M and the authors' counter
    assert rows == {"edaformer-t": ["4.9", "4.9", "512x512@150", "5.6", "5.62"],
                    "edaformer-b": ["29.4", "29.4", "512x512@150", "31.9", "31.93"]}
