"""SeMask-Mask2Former: parameter counts and key names of the authors' model, outputs and the set loss
against their code run on seeded weights (fixture: tests/fixtures/semask_m2f_official.json)."""
import json
from pathlib import Path

import pytest
import torch

from seeded import seeded_input, seeded_state_dict
from transeg.families.semask.encoder import global_stages_mask2former
from transeg.families.semask.convert import convert_mask2former
from transeg.flops import count_params, meta_model
from transeg.heads.mask2former_loss import point_sample, uncertain_points
from transeg.registry import create_model

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "semask_m2f_official.json").read_text())
NAME = "semask-swin-l-mask2former"


def _tiny_args(config):
    c = FIXTURE["configs"][config]
    swin, pix, dec = c["swin"], c["pixel_decoder"], c["predictor"]
    return dict(embed_dim=swin["embed_dim"], depths=tuple(swin["depths"]), num_heads=tuple(swin["num_heads"]),
                window_size=swin["window_size"], sem_window_size=swin["sem_window_size"], hidden_dim=dec["hidden_dim"],
                enc_layers=pix["transformer_enc_layers"], enc_ffn_dim=pix["transformer_dim_feedforward"],
                dec_layers=dec["dec_layers"], dec_ffn_dim=dec["dim_feedforward"], num_queries=dec["num_queries"])


@pytest.mark.parametrize("key,k", [("L-150", 150), ("L-19", 19)])
def test_params_equal_the_authors_model(key, k):
    """The authors' model counted by running their code (backbone + sem_seg_head); 150 classes is the
    README's 222M (222.63M, truncated as the README does)."""
    n = count_params(meta_model(NAME, k))
    assert n == FIXTURE["params"][key]["num_params"]
    if k == 150:
        assert int(n / 1e6) == 222


def test_checkpoint_keys_and_shapes_map_one_to_one():
    """Every key of the authors' L-150 state dict (shapes only, on the meta device) converts to a key
    of ours with the same shape, and nothing of ours is left without one."""
    state = {k: torch.empty(s, device="meta") for k, s in FIXTURE["keys"]["L-150"]}
    state.update(pixel_mean=torch.zeros(3, 1, 1), pixel_std=torch.ones(3, 1, 1))  # detectron2's extras
    found = convert_mask2former(state, "m2f.pth")
    assert found["variant"] == NAME and found["num_classes"] == 150
    ours = {k: tuple(v.shape) for k, v in meta_model(NAME, 150).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in found["state"].items()} == ours


def test_semantic_layer_rules_follow_the_authors_code():
    """Invisible in the weights: global semantic attention in stage 4 only with 150 classes (their
    BasicLayer's index_list), and the Cityscapes config's semantic window 7 beside Swin's 12."""
    assert global_stages_mask2former(150) == (3,) and global_stages_mask2former(19) == ()
    for key, k in (("L-150", 150), ("L-19", 19)):
        model = meta_model(NAME, k)
        assert "".join("W" if s.semantic_layer.windowed else "G" for s in model.backbone.layers) == FIXTURE["stage_types"][key]
        assert {s.semantic_layer.window_size for s in model.backbone.layers} == {FIXTURE["configs"][key]["swin"]["sem_window_size"]}


def _tiny_model(config, weight_seed):
    authors = seeded_state_dict(FIXTURE["keys"][config], weight_seed)
    k = FIXTURE["configs"][config]["num_classes"]
    state = convert_mask2former(authors, "tiny.pth", model=NAME)["state"]  # index buffers recomputed
    model = create_model(NAME, num_classes=k, **_tiny_args(config))
    model.load_state_dict(state, strict=True)
    return model.eval()


def _sampled(t, ref, name):
    assert list(t.shape) == ref[f"{name}_shape"][-t.dim():]
    return t.flatten()[torch.tensor(ref[f"{name}_sample_index"])], torch.tensor(ref[f"{name}_sample_values"])


@pytest.mark.parametrize("case", FIXTURE["cases"], ids=[c["label"] for c in FIXTURE["cases"]])
def test_outputs_equal_the_authors_code(case):
    """Class logits, mask logits, the semantic decoder's map and the final per-class scores at the
    input size (masks upsampled to the padded size before the sigmoid, then cropped) equal the
    authors' model to 1e-4; the padded case (200x296 -> 224x320) and the all-windowed 19-class
    model included."""
    model = _tiny_model(case["config"], case["weight_seed"])
    x = seeded_input(case["input_shape"], case["input_seed"])
    with torch.no_grad():
        features, priors = model.backbone(x)
        out = model.decode_head.decode(features)
        model.decode_head.train()
        sem = model.decode_head((features, priors))["sem"]
        model.decode_head.eval()
        scores = model.logits(x)[0]
    ref = case
    assert (out["pred_logits"][0] - torch.tensor(ref["pred_logits"])).abs().max() <= 1e-4
    for name, t in (("pred_masks", out["pred_masks"]), ("sem_pred", sem), ("sem_seg", scores)):
        ours, theirs = _sampled(t, ref, name)
        assert (ours - theirs).abs().max() <= 1e-4, name
    assert list(scores.shape[-2:]) == case["input_shape"][-2:]
    pixels = torch.tensor(ref["sem_seg_argmax_pixel_index"])
    agree = (scores.argmax(0).flatten()[pixels] == torch.tensor(ref["sem_seg_argmax_values"])).float().mean()
    assert agree >= 0.99  # near-ties may flip on rounding
    assert scores.double().sum().item() == pytest.approx(ref["sem_seg_sum"], rel=1e-5)


def test_set_loss_equals_the_authors_criterion():
    """Same outputs, same label, same seed before the loss: every weighted term of the authors'
    SeMaskSetCriterion (2·CE, 5·BCE, 5·dice on 12,544 sampled points for the final and 9 auxiliary
    predictions, 0.4·semantic CE) is reproduced, because the random points are drawn in the same order."""
    case = FIXTURE["loss"]
    model = _tiny_model(case["config"], case["weight_seed"])
    x = seeded_input(case["input_shape"], case["input_seed"])
    # the fixture's label_generator: a 16x16 grid of 6 values (255 = ignore) blown up 8x
    g = torch.Generator().manual_seed(87)
    grid = torch.randint(0, 6, (16, 16), generator=g)
    assert grid.tolist() == case["label_grid"]
    label = torch.tensor([3, 17, 42, 99, 149, 255])[grid].repeat_interleave(8, 0).repeat_interleave(8, 1)[None]
    with torch.no_grad():
        model.decode_head.train()
        outputs = model.decode_head(model.backbone(x))
        torch.manual_seed(88)
        losses = model.decode_head.loss(outputs, label)
    weights = {"ce": 2.0, "mask": 5.0, "dice": 5.0, "cate": 0.4}
    for name, expected in case["weighted_losses"].items():
        if name.startswith("loss_cate_"):  # the authors' zero placeholders on auxiliary outputs
            assert expected == 0.0
            continue
        term = name.split("_")[1]
        assert weights[term] * losses[name].item() == pytest.approx(expected, rel=1e-4, abs=1e-5), name
    assert losses["loss"].item() == pytest.approx(case["weighted_loss_sum"], rel=1e-4)


def test_uncertain_points_keep_the_logits_nearest_zero():
    """A mask whose logit is the x coordinate minus 0.5, scaled: the 75% importance points must be
    the sampled ones closest to x = 0.5, the remaining 25% uniform."""
    torch.manual_seed(0)
    w = 64
    logits = ((torch.arange(w) + 0.5) / w - 0.5).expand(w, w)[None] * 10
    coords = uncertain_points(logits, num_points=400, oversample_ratio=3.0, importance_sample_ratio=0.75)
    assert coords.shape == (1, 400, 2)
    kept = point_sample(logits, coords[:, :300]).abs()
    # of 1200 uniform draws the 300 most uncertain lie within ~1/8 of the centre line (|logit| < ~1.25)
    assert kept.max() < 1.5
    assert point_sample(logits, coords[:, 300:]).abs().max() > 3.0  # the uniform top-up spreads out


def test_conversion_carries_the_released_test_protocols(tmp_path):
    """detectron2's layout ({'model': ...}) is recognised by `transeg convert --from semask`; the ADE20K
    model gets the whole-image test at short side 640 (long <= 2560), the Cityscapes one 1024 (<= 2048)."""
    state = {k: torch.empty(s, device="meta") for k, s in FIXTURE["keys"]["L-150"]}
    from transeg.families.semask import convert as semask
    found = semask.convert({"model": state, "iteration": 159999}, "m2f.pth")
    assert found["variant"] == NAME and found["test"].mode == "whole" and found["test"].scale == (2560, 640)
    assert semask.test_protocol_mask2former(19).scale == (2048, 1024)


def test_counts_on_the_meta_device_and_runs_in_native_bf16():
    """`transeg models` counts GFLOPs on the meta device, where autocast does not exist (the pixel
    decoder's fp32 guard used to crash it). Native bf16 weights run (positions and the deformable
    sampling stay fp32; sine position embeddings follow the features' dtype). bf16 keeps 8 significant
    bits (0.4% per rounding) through dozens of layers: the scores (sums of probabilities over the
    queries, up to ~30 here) stay within 2% of fp32's largest, as autocast's do (0.8% on this model),
    every pixel keeps its class, and float32 scores come back at the input size."""
    from transeg.flops import count_gmacs

    assert count_gmacs(meta_model(NAME, 150), (64, 64))["total"] > 1
    model = create_model(NAME, num_classes=5, **_tiny_args(next(iter(FIXTURE["configs"])))).eval()
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fp32 = model.logits(x)
        bf16 = model.optimize_for_inference(torch.bfloat16).logits(x)
    assert model.dtype == torch.bfloat16 and bf16.dtype == torch.float32
    assert bf16.shape == fp32.shape == (1, 5, 64, 96)
    assert (bf16 - fp32).abs().max().item() <= 0.02 * fp32.abs().max().item()
    assert (bf16.argmax(1) == fp32.argmax(1)).float().mean().item() >= 0.99
    assert fp32.std().item() > 0.01  # scores that vary, not a comparison of constants
