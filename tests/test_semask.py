"""SeMask-FPN: parameter counts, logits against the authors' code, the loss, and Hugging Face Swin as oracle."""
import json
from pathlib import Path

import pytest
import torch

import transeg
from seeded import sample_positions, seeded_input, seeded_state_dict
from transeg.contracts import LossInputs
from transeg.convert import convert
from transeg.flops import count_gmacs, count_params, meta_model
from transeg.families.semask.fpn_head import semantic_decoder

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "semask_official.json").read_text())
NAMES = {"T": "semask-swin-t-fpn", "S": "semask-swin-s-fpn", "B": "semask-swin-b-fpn", "L": "semask-swin-l-fpn"}

# The authors' model counted by running their code, for 150 / 19 / 171 classes.
OFFICIAL = [(v, k, n) for v, by_k in {"T": (34_655_748, 34_243_753, 34_721_793), "S": (55_973_652, 55_561_657, 56_039_697),
                                      "B": (96_485_826, 95_948_071, 96_572_031),
                                      "L": (210_791_934, 210_002_659, 210_918_459)}.items()
            for k, n in zip((150, 19, 171), by_k)]


@pytest.mark.parametrize("variant,k,official", OFFICIAL, ids=[f"{o[0]}-{o[1]}" for o in OFFICIAL])
def test_params_equal_the_authors_model(variant, k, official):
    """And the README's 35M (Cityscapes 34M) / 56M / 96M / 211M (ADE20K heads) when rounded."""
    n = count_params(meta_model(NAMES[variant], k))
    assert n == official
    if k == 150 or (variant == "T" and k == 19):
        assert round(n / 1e6) == {"T": 34 if k == 19 else 35, "S": 56, "B": 96, "L": 211}[variant]


def test_global_semantic_stages_follow_the_authors_rule():
    """Invisible in the weights (the authors' backbone code decides): T/S/L above 19 classes attend globally in stages 3-4."""
    expected = {("T", 150): (2, 3), ("T", 19): (), ("B", 150): (), ("L", 171): (2, 3), ("S", 19): ()}
    for (v, k), stages in expected.items():
        model = meta_model(NAMES[v], k)
        assert model.backbone.global_stage_ids == stages
        assert [s.semantic_layer.windowed for s in model.backbone.layers] == [i not in stages for i in range(4)]
    for case in FIXTURE["cases"]:  # what the authors' code decided in each fixture case
        k = case["num_classes"]
        assert ["G" if i in meta_model(NAMES[case["variant"]], k).backbone.global_stage_ids else "W"
                for i in range(4)] == case["semantic_layer_types"]


def test_gmacs_equal_the_authors_model_count():
    """conv + matmul + attention MACs of the authors' model at 512², counted by running their code: T 41.5, S 65.3, B 114.3."""
    for v, g in (("T", 41.5), ("S", 65.3), ("B", 114.3)):
        assert round(count_gmacs(meta_model(NAMES[v], 150), (512, 512))["matmul"], 1) == g


def _official_pth(case, path):
    state = seeded_state_dict(FIXTURE["keys"][case["model_key"]], case["weight_seed"])
    k = case["num_classes"]
    torch.save({"meta": {"CLASSES": [f"c{i}" for i in range(k)], "PALETTE": [[i, i, i] for i in range(k)]},
                "state_dict": state}, path)


def _model(case, tmp_path):
    _official_pth(case, tmp_path / "semask.pth")
    model = convert(tmp_path / "semask.pth", "semask")
    assert model.meta["variant"] == NAMES[case["variant"]]
    return model


@pytest.mark.parametrize("index", range(len(FIXTURE["cases"])), ids=[c["label"] for c in FIXTURE["cases"]])
def test_logits_equal_the_authors_code(index, tmp_path):
    """Main and semantic-decoder logits of converted seeded weights equal the authors' to 1e-4: T at 512²,
    T at 333x461 (padding to the patch, the windows and odd patch merging), T with 19 classes (all stages
    windowed), B (window 12), L (global stages). The seeded relative_position_index is replaced by the
    real one, as the fixture's run did."""
    case = FIXTURE["cases"][index]
    model = _model(case, tmp_path)
    x = seeded_input(case["input_shape"], case["input_seed"])
    with torch.no_grad():
        features, priors = model.backbone(x)
        head = model.decode_head
        out = LossInputs(seg=head((features, priors)), cls=semantic_decoder(priors))  # the training output's type
    assert [list(f.shape[1:]) for f in features] == [list(s[1:]) for s in case["feature_shapes"]]
    assert [list(p.shape) for p in priors] == case["prior_shapes"]
    for key, name in (("seg", "seg"), ("cls", "cls")):
        logits = out[key]
        assert list(logits.shape) == case[f"{name}_logits_shape"]
        idx = sample_positions(logits.shape, len(case[f"{name}_sample_index"]), case[f"{name}_sample_seed"])
        assert idx.tolist() == case[f"{name}_sample_index"]
        assert (logits.flatten()[idx] - torch.tensor(case[f"{name}_sample_values"])).abs().max().item() <= 1e-4


def test_loss_equals_the_authors(tmp_path):
    """loss_ce + 0.4 · loss_cate (mean over all pixels, ignored included), and with OHEM (thresh None: the
    5000 · N highest-loss labelled pixels, divided by all pixels) -- the authors' values on the t19 case."""
    ref = FIXTURE["loss"]
    case = next(c for c in FIXTURE["cases"] if c["label"] == ref["case"])
    model = _model(case, tmp_path)
    with torch.no_grad():  # the authors' loss on their eval-mode outputs (no dropout / drop path)
        features, priors = model.backbone(seeded_input(case["input_shape"], case["input_seed"]))
        head = model.decode_head
        out = LossInputs(seg=head((features, priors)), cls=semantic_decoder(priors))  # the training output's type
    label = torch.randint(0, case["num_classes"], ref["label_shape"], generator=torch.Generator().manual_seed(90))
    label[:, :ref["ignored_rows"], :] = 255
    losses = model.loss(out, label)
    assert losses["loss_ce"].item() == pytest.approx(ref["loss_ce"], rel=1e-5)
    assert losses["loss_cate"].item() == pytest.approx(ref["loss_cate"], rel=1e-5)
    assert losses["loss"].item() == pytest.approx(ref["loss_total"], rel=1e-5)
    ohem = model.loss(out, label, ohem={"thresh": None, "min_kept": 5000})
    assert ohem["loss_ce"].item() == pytest.approx(ref["ohem"]["loss_ce"], rel=1e-4)
    assert ohem["loss"].item() == pytest.approx(ref["ohem"]["loss_total"], rel=1e-4)


def _random_hf_swin(window=7, depths=(1, 2, 1, 2)):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=448, embed_dim=32, depths=list(depths), num_heads=[1, 2, 2, 4],
                                  window_size=window, out_features=["stage1", "stage2", "stage3", "stage4"])
    hf = transformers.SwinBackbone(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf


def test_hugging_face_swin_is_an_oracle_for_the_plain_swin():
    """A random HF SwinBackbone converted into backbones/swin.py gives the same four normalised stage maps.
    At 448² every stage is larger than the 7-window (HF shrinks the window to the map when it is not)."""
    from transeg.backbones import SwinTransformer
    from transeg.convert.swin import fit_to

    hf = _random_hf_swin()
    ours = SwinTransformer(embed_dim=32, depths=(1, 2, 1, 2), num_heads=(1, 2, 2, 4), window_size=7).eval()
    ours.load_state_dict(fit_to(ours, hf.state_dict(), "hf"))
    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        expected = hf(pixel_values=x).feature_maps
        got = ours(x)
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        assert (e - g).abs().max().item() <= 1e-4


def test_imagenet_swin_weights_with_another_window(tmp_path):
    """Swin classification weights with window 7 initialise a window-12 SeMask backbone: the bias tables are
    resized bicubically, head / final norm / attn_mask dropped, the semantic layers keep their init."""
    import torch.nn.functional as F

    from transeg.backbones import SwinTransformer
    from transeg.convert import load_backbone_weights

    src = SwinTransformer(embed_dim=32, depths=(1, 2, 1, 2), num_heads=(1, 2, 2, 4), window_size=7)
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("norm")}
    state.update({"norm.weight": torch.ones(256), "norm.bias": torch.zeros(256), "head.weight": torch.zeros(1000, 256),
                  "head.bias": torch.zeros(1000), "layers.0.blocks.1.attn_mask": torch.zeros(4, 49, 49)})
    torch.save({"model": state}, tmp_path / "swin_tiny_patch4_window7_224.pth")
    model = transeg.create_model("semask-swin-b-fpn", num_classes=5, embed_dim=32, depths=(1, 2, 1, 2),
                                 num_heads=(1, 2, 2, 4))
    sem = model.backbone.layers[2].semantic_layer.class_injection[0].mlp_v.weight.clone()
    load_backbone_weights(model, tmp_path / "swin_tiny_patch4_window7_224.pth")
    table = src.layers[1].blocks[0].attn.relative_position_bias_table
    expected = F.interpolate(table.T.reshape(1, 2, 13, 13), size=(23, 23), mode="bicubic", align_corners=False)
    got = model.backbone.layers[1].blocks[0].attn.relative_position_bias_table
    assert torch.allclose(got, expected.reshape(2, -1).T)
    assert torch.equal(model.backbone.layers[2].blocks[0].attn.qkv.weight, src.layers[2].blocks[0].attn.qkv.weight)
    assert torch.equal(model.backbone.layers[2].semantic_layer.class_injection[0].mlp_v.weight, sem)


def test_tiny_semask_trains_with_its_two_losses(tmp_path):
    from conftest import TINY_DATA
    from transeg.cli import main

    args = dict(embed_dim=16, depths=[1, 2, 1, 1], num_heads=[1, 1, 2, 2], window_size=4, channels=16)
    assert main(["train", "--model", "semask-swin-t-fpn", "--data", TINY_DATA, "--out", str(tmp_path), "--iters", "6",
                 "--batch-size", "2", "--device", "cpu", "--set", f"model_args={json.dumps(args)}", "warmup_iters=0",
                 "log_interval=3", "eval_interval=6", "ckpt_interval=6", "lr=1e-3",
                 'ohem={"thresh": null, "min_kept": 100}']) == 0
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len([r for r in records if "loss" in r]) == 2
    model = transeg.load(tmp_path / "model.safetensors")
    assert model.backbone.global_stage_ids == ()  # 16-wide: the authors' rule gives windows everywhere
    assert model.predict(torch.randn(1, 3, 37, 45)).shape == (1, 37, 45)


@pytest.mark.parametrize("hp,wp,w", [(7, 7, 7), (14, 21, 7), (28, 14, 7), (24, 36, 12)])
def test_shift_mask_follows_swin_regions(hp, wp, w):
    """Swin's shifted-window mask, from its definition: after the cyclic shift by s = w // 2, padded rows
    [0, hp - w), [hp - w, hp - s), [hp - s, hp) are regions 0, 1, 2 (columns likewise), and two tokens of
    a window may attend (0) only when they share both regions, else -100. Only the last row and column
    of windows hold more than one region; the bottom-right window holds four. Off-by-one band edges
    (`i > n - w`) fail all four cases."""
    from transeg.backbones.swin import shift_mask

    s = w // 2
    band = lambda i, n: 0 if i < n - w else 1 if i < n - s else 2  # noqa: E731
    mask = shift_mask(hp, wp, w, s, torch.device("cpu"))
    assert mask.shape == ((hp // w) * (wp // w), w * w, w * w)
    for win in range(mask.shape[0]):
        r0, c0 = (win // (wp // w)) * w, (win % (wp // w)) * w
        region = [(band(r0 + t // w, hp), band(c0 + t % w, wp)) for t in range(w * w)]
        expected = torch.tensor([[0.0 if a == b else -100.0 for b in region] for a in region])
        assert torch.equal(mask[win], expected), win
    last = mask[-1]
    assert len({tuple(row.tolist()) for row in last}) == 4 and (mask[0] == 0).all() == (hp > w and wp > w)
