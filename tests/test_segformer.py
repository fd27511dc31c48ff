"""SegFormer: structure, parameter counts, GFLOPs and logits against the authors' code and Hugging Face."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import transeg
from seeded import sample_positions, seeded_input, seeded_state_dict
from transeg.convert import convert
from transeg.flops import count_gmacs, count_params, meta_model

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "segformer_official.json").read_text())

# The authors' model with 150 classes, counted by running their code: these include
# their dead 128->K `conv_seg` (128*150 + 150 = 19,350 params), which transeg leaves out.
OFFICIAL_PARAMS = {"b0": 3_772_044, "b1": 13_735_148, "b2": 27_481_324, "b3": 47_357_164, "b4": 64_127_724,
                   "b5": 84_728_044}
PAPER_PARAMS_M = {"b0": 3.8, "b1": 13.7, "b2": 27.5, "b3": 47.3, "b4": 64.1, "b5": 84.7}  # SegFormer Table 1
CONV_SEG = 128 * 150 + 150


@pytest.mark.parametrize("b", list(OFFICIAL_PARAMS))
def test_params_equal_the_authors_model(b):
    model = meta_model(f"segformer-{b}", 150)
    n = count_params(model)
    assert n + CONV_SEG == OFFICIAL_PARAMS[b]
    # without conv_seg the count still rounds to the paper's figure (e.g. B0: 3,752,694 -> 3.8M)
    assert round(n / 1e6, 1) == PAPER_PARAMS_M[b]
    assert transeg.get_variant(f"segformer-{b}").paper.official_params == OFFICIAL_PARAMS[b]


# GFLOPs as the paper prints them (Table 1, ADE20K 512x512; B5 at 640x640), and the authors'
# get_flops.py counts to two decimals (measured by running their code).
@pytest.mark.parametrize("b,size,paper,official", [
    ("b0", (512, 512), 8.4, 8.40), ("b1", (512, 512), 15.9, 15.90), ("b2", (512, 512), 62.4, 62.39),
    ("b3", (512, 512), 79.0, 79.03), ("b4", (512, 512), 95.7, 95.65), ("b5", (640, 640), 183.3, 183.30),
])
def test_gflops_in_the_papers_convention(b, size, paper, official):
    g = count_gmacs(meta_model(f"segformer-{b}", 150), size)["total"]
    assert round(g, 1) == paper
    assert round(g, 2) == official


def test_cityscapes_gflops_use_150_class_head():
    # Digest §6: the paper's Cityscapes B0 figure 125.5 is what a 150-class head gives at 1024x2048
    # (125.48); with the real 19 classes the authors' counter gives 121.07.
    assert round(count_gmacs(meta_model("segformer-b0", 150), (1024, 2048))["total"], 2) == 125.48
    assert round(count_gmacs(meta_model("segformer-b0", 19), (1024, 2048))["total"], 2) == 121.07


def _official_pth(case, path):
    """An official-layout .pth like the released ones: {'meta': {...}, 'state_dict': ...}, weights
    from the fixture's seed, plus the dead conv_seg and a numpy palette in meta (mmcv-era files can
    carry one) to exercise the safe loader."""
    state = seeded_state_dict(case["keys"], case["weight_seed"])
    k = case["num_classes"]
    meta = {"CLASSES": tuple(f"class{i}" for i in range(k)), "PALETTE": np.arange(3 * k, dtype=np.int64).reshape(k, 3),
            "mmseg_version": "0.11.0+abcdef0", "iter": 160000, "epoch": 1, "seed": None, "config": "model = dict()"}
    torch.save({"meta": meta, "state_dict": state}, path)


@pytest.mark.parametrize("index", range(len(FIXTURE["cases"])),
                         ids=[f"{c['variant']}-{c['num_classes']}-{'x'.join(map(str, c['input_shape']))}" for c in FIXTURE["cases"]])
def test_logits_equal_the_authors_code(index, tmp_path):
    """Converted seeded weights give the authors' logits (fixture made by running their model) to 1e-4."""
    case = FIXTURE["cases"][index]
    _official_pth(case, tmp_path / "official.pth")
    model = convert(tmp_path / "official.pth", "segformer")
    assert model.meta["variant"] == case["variant"]
    assert model.meta["classes"][3] == "class3"
    with torch.no_grad():
        logits = model(seeded_input(case["input_shape"], case["input_seed"]))
    assert list(logits.shape) == case["logits_shape"]
    idx = sample_positions(logits.shape, len(case["sample_index"]), case["sample_seed"])
    assert idx.tolist() == case["sample_index"]
    got = logits.flatten()[idx]
    expected = torch.tensor(case["sample_values"])
    assert (got - expected).abs().max().item() <= 1e-4
    assert abs(logits.abs().max().item() - case["logits_abs_max"]) <= 1e-4


def test_convert_cli_round_trip(tmp_path):
    case = FIXTURE["cases"][0]
    _official_pth(case, tmp_path / "b0.pth")
    from transeg.cli import main
    assert main(["convert", str(tmp_path / "b0.pth"), str(tmp_path / "b0.safetensors"), "--from", "segformer"]) == 0
    model = transeg.load(tmp_path / "b0.safetensors")
    x = seeded_input(case["input_shape"], case["input_seed"])
    with torch.no_grad():
        got = model(x).flatten()[torch.tensor(case["sample_index"])]
    assert (got - torch.tensor(case["sample_values"])).abs().max().item() <= 1e-4


def test_convert_names_missing_and_misshapen_keys(tmp_path):
    case = FIXTURE["cases"][0]
    state = seeded_state_dict(case["keys"], 0)
    del state["backbone.block1.0.attn.kv.weight"]
    state["backbone.block1.0.mlp.fc1.bias"] = torch.zeros(7)
    torch.save({"state_dict": state}, tmp_path / "broken.pth")
    with pytest.raises(transeg.TransegError, match=r"1 missing: backbone.block1.0.attn.kv.weight.*"
                                                   r"1 misshapen: backbone.block1.0.mlp.fc1.bias \(7,\)"):
        convert(tmp_path / "broken.pth", "segformer")


def test_malicious_pickle_is_refused(tmp_path):
    import os

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"state_dict": {}, "meta": Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(transeg.TransegError, match="evil.pth: refused: loading it would run code"):
        convert(tmp_path / "evil.pth", "segformer")
    assert not (tmp_path / "pwned").exists()


def _random_hf(num_labels, seed=0, **config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf = transformers.SegformerForSemanticSegmentation(transformers.SegformerConfig(num_labels=num_labels, **config))
    with torch.no_grad():  # move norms, biases and BN statistics off their defaults
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
        for name, b in hf.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1)
    return hf.eval()


@pytest.mark.parametrize("config,size", [
    (dict(), (64, 96)),                                                                         # B0
    (dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 2, 2, 2], decoder_hidden_size=256), (67, 93)),  # B1, odd size
])
def test_hugging_face_conversion(tmp_path, config, size):
    """HF SegformerForSemanticSegmentation -> save_pretrained -> transeg convert: equal logits.

    HF builds its block and stage LayerNorms with eps 1e-5; the authors (and transeg) use 1e-6
    (the authors' MiT). As-is the logits differ by ~1e-5 (bound 1e-4); with HF's eps set to the authors'
    value the only difference left is kernel rounding (bound 1e-5)."""
    hf = _random_hf(150, **config)
    hf.save_pretrained(tmp_path / "hf")
    from transeg.cli import main
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.safetensors"), "--from", "segformer-hf"]) == 0
    model = transeg.load(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        assert (hf(pixel_values=x).logits - ours).abs().max().item() <= 1e-4
        for name, module in hf.named_modules():
            # block norms (layernorm_before/after) and stage-output norms; not patch-embed or reduction norms
            block_norm = "layernorm_" in name
            stage_norm = name.endswith(".layer_norm") and ".blocks." not in name and "patch_embeddings" not in name
            if isinstance(module, torch.nn.LayerNorm) and (block_norm or stage_norm):
                module.eps = 1e-6
        assert (hf(pixel_values=x).logits - ours).abs().max().item() <= 1e-5


def test_hugging_face_in_memory_names():
    """transformers>=5 names its modules differently in memory (`segformer.stages.0.layer_norm`,
    `...patch_embeddings.layer_norm`) from what it saves; both must map, and a stage norm must never
    land on a patch-embedding norm (which a too-loose pattern once did, silently, at load strict)."""
    from transeg.families.segformer.convert_hf import hf_to_official

    hf = _random_hf(150)
    model = transeg.create_model("segformer-b0", num_classes=150).eval()
    model.load_state_dict(hf_to_official(hf.state_dict(), "in-memory"), strict=True)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(pixel_values=x).logits - model(x)).abs().max().item() <= 1e-4


def test_odd_input_sizes_use_ceil_grids():
    model = transeg.create_model("segformer-b0", num_classes=4, embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 1, 1),
                                 depths=(1, 1, 1, 1), decoder_dim=16).eval()
    feats = model.backbone(torch.randn(1, 3, 67, 93))
    # ceil(67/4)=17, ceil(17/2)=9, 5, 3 and ceil(93/4)=24, 12, 6, 3 (the overlapping patch embeddings' output sizes)
    assert [tuple(f.shape[-2:]) for f in feats] == [(17, 24), (9, 12), (5, 6), (3, 3)]
    assert model.predict(torch.randn(1, 3, 67, 93)).shape == (1, 67, 93)


def test_hugging_face_class_names_are_carried(tmp_path):
    """`convert --from segformer-hf` keeps config.json's id2label as the model's class names, in id order."""
    from transeg.cli import main

    names = ["sky", "road", "\x1b[31mcar"]  # any string is a name (printed escaped)
    hf = _random_hf(3, id2label={i: n for i, n in enumerate(names)}, label2id={n: i for i, n in enumerate(names)})
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.safetensors"), "--from", "segformer-hf"]) == 0
    assert transeg.load(tmp_path / "m.safetensors").classes == names
