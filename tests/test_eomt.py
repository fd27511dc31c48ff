"""EoMT (Kerssies et al., CVPR 2025): Hugging Face's EomtForUniversalSegmentation is the oracle. Its
parameters equal the authors' timm-based model (same modules, same shapes), and its forward is theirs, so
a seeded HF model converted with `transeg convert --from eomt` (HF names, or the authors' names the
converter also reads) must give the same mask and class logits, and the same per-pixel semantic scores the
authors' semantic inference forms from them (sum over queries of softmax(class) x sigmoid(mask))."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import transeg
from seeded import seeded_input, seeded_state_dict
from transeg.families.eomt.encoder import MaskAnnealing
from transeg.flops import count_gmacs, count_params, meta_model
from transeg.heads.mask2former_loss import mask2former_loss, semantic_targets
from transeg.registry import VARIANTS

transformers = pytest.importorskip("transformers")
from transformers import EomtConfig, EomtForUniversalSegmentation  # noqa: E402

# A 4-block ViT (width 64, 4 heads, patch 16, 4 registers) on 64x64 inputs, 10 queries joining the last 2 blocks,
# 5 classes: every part of the real model (queries, registers, LayerScale, masked attention, 2 upscale blocks).
TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=16, num_queries=10,
            num_blocks=2, num_labels=5, num_register_tokens=4)


def _hf_model(probs, seed=0):
    """HF's model with seeded weights (tests/seeded.py) and masked-attention probability `probs` per block."""
    torch.manual_seed(seed)
    hf = EomtForUniversalSegmentation(EomtConfig(**TINY))
    state = hf.state_dict()
    shapes = [(k, v.shape) for k, v in state.items() if k not in ("attn_mask_probs", "criterion.empty_weight")]
    state.update(seeded_state_dict(shapes, seed))
    state["attn_mask_probs"] = torch.full((TINY["num_blocks"],), float(probs))
    hf.load_state_dict(state)
    return hf


def _converted(hf, tmp_path, layout="hf"):
    """HF's save_pretrained directory (or the authors' Lightning file) through `transeg convert`."""
    from transeg.convert import convert
    from transeg.families.eomt.convert import hf_to_authors

    if layout == "hf":
        hf.save_pretrained(tmp_path / "hf")
        src = tmp_path / "hf"
    else:
        src = tmp_path / "pytorch_model.bin"
        authors = hf_to_authors(hf.state_dict(), "hf")
        authors["criterion.empty_weight"] = torch.ones(TINY["num_labels"] + 1)
        torch.save({"state_dict": authors}, src)
    # the authors' file has no config: the head count (not in the weights) comes from the variant (16) unless given
    return convert(src, "eomt", model="eomt-dinov2-l16") if layout == "hf" else _with_heads(src)


def _with_heads(src):
    from transeg.checkpoint import load_state_dict_checked
    from transeg.families.eomt import convert as eomt

    found = eomt.convert(src, src, model="eomt-dinov2-l16")
    model = transeg.create_model(found["variant"], num_classes=found["num_classes"],
                                 **{**found["overrides"], "num_heads": TINY["num_attention_heads"]})  # overrides: mask_annealing=None too
    load_state_dict_checked(model, found["state"], source=src)
    model.protocol = found["test"]
    return model.eval()


@pytest.mark.parametrize("probs", [0.0, 1.0], ids=["released-no-mask", "masked-attention"])
@pytest.mark.parametrize("layout", ["hf", "authors"])
def test_logits_equal_hugging_face(probs, layout, tmp_path):
    """Mask logits, class logits and full-resolution semantic scores within 1e-4 of HF (measured: 0 without
    the masked attention, ~1e-5 on mask logits of magnitude ~20 with it, which HF applies as -1e9 biases)."""
    hf = _hf_model(probs).eval()
    model = _converted(hf, tmp_path, layout)
    assert model.backbone._probs == [probs] * TINY["num_blocks"]
    x = seeded_input((2, 3, 64, 64), 1)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        out = model.decode_head.decode(model.backbone(x))
        scores = model.logits(x)
    assert (out["pred_masks"] - ref.masks_queries_logits).abs().max() < 1e-4
    assert (out["pred_logits"] - ref.class_queries_logits).abs().max() < 1e-4
    masks = F.interpolate(ref.masks_queries_logits, size=(64, 64), mode="bilinear", align_corners=False)
    expected = torch.einsum("bqhw,bqc->bchw", masks.sigmoid(), ref.class_queries_logits.softmax(-1)[..., :-1])
    assert scores.shape == (2, TINY["num_labels"], 64, 64)
    assert (scores - expected).abs().max() < 1e-4
    # the intermediate predictions exist exactly where masked attention runs
    assert len(out["aux_outputs"]) == (TINY["num_blocks"] if probs > 0 else 0)


def test_converted_checkpoint_carries_the_windowed_test(tmp_path):
    """The authors' semantic test: short side to the crop (64 here), crop-sized windows along the long side.
    For a 48x64 image: resized to 64x85 (85 = round(64 * 64 / 48)), windows at columns 0 and 21 (= 85 - 64),
    as their evenly spread windows place two; the scores come back at 48x64."""
    from transeg.inference import slide_windows
    from transeg.data.transforms import TestTransform

    model = _converted(_hf_model(0.0), tmp_path)
    p = model.protocol
    assert (p.mode, p.crop, p.stride, p.size_divisor) == ("slide", (64, 64), (64, 64), None)
    h, w = TestTransform(scale=p.scale, size_divisor=None).output_size((48, 64))
    assert (h, w) == (64, 85)
    assert slide_windows(h, w, p.crop, p.stride) == [(0, 64, 0, 64), (0, 64, 21, 85)]
    image = (torch.rand(3, 48, 64) * 255).to(torch.uint8)
    assert model.predict(image.permute(1, 2, 0).numpy()).labels.shape == (48, 64)


@pytest.mark.parametrize("name", [n for n, v in VARIANTS.items() if v.family == "eomt"])
def test_params_equal_hugging_face(name):
    """Parameters at the released class count equal HF's model at the authors' config (built on meta): 316,020,887
    for ADE20K at 512 (the paper's 316M), 319,032,340 for Cityscapes at 1024 (3072 more position embeddings x 1024);
    DINOv3 at 512 (HF's EomtDinov3): 314,947,735, i.e. without the 1024 x 1024 position embeddings and the 24 key
    biases of 1024."""
    from transformers import EomtDinov3Config, EomtDinov3ForUniversalSegmentation

    v = VARIANTS[name]
    k, crop = v.paper.official_classes, v.kwargs["crop"]
    dinov3 = v.kwargs.get("rope_theta") is not None
    config, cls = (EomtDinov3Config, EomtDinov3ForUniversalSegmentation) if dinov3 else (EomtConfig, EomtForUniversalSegmentation)
    with torch.device("meta"):
        hf = cls(config(image_size=crop, num_queries=100, num_labels=k))
    theirs = sum(p.numel() for p in hf.parameters())
    assert count_params(meta_model(name, k)) == theirs == v.paper.official_params
    if v.paper.params_m:
        assert round(theirs / 1e6) == v.paper.params_m


def _expected_gmacs(d, depth, patch, crop, queries, blocks, regs, k):
    """One forward at crop x crop, in the fvcore convention (matmul/conv MACs without biases, LayerNorm 5 per
    element, the final bilinear resize of the scores 4 per output element), worked out from the architecture."""
    g = crop // patch
    n1 = 1 + regs + g * g          # class + registers + patches
    n2 = n1 + queries              # ... + queries in the last `blocks` blocks
    block = lambda n: n * 12 * d * d + 2 * n * n * d + 2 * n * d * 5  # qkv+proj+mlp, QK^T and AV, two LayerNorms
    macs = g * g * d * 3 * patch * patch                                # patch embedding
    macs += (depth - blocks) * block(n1) + blocks * block(n2) + n2 * d * 5   # blocks, final norm
    macs += queries * d * (k + 1) + 3 * queries * d * d                 # class head, mask MLP
    size = g
    for _ in range(int(math.log2(patch)) - 2):                          # upscale: transposed conv, depth-wise conv, LN2d
        macs += size * size * 4 * d * d
        size *= 2
        macs += size * size * (9 * d + 5 * d)
    macs += queries * d * size * size + k * queries * size * size       # mask logits, semantic scores
    return (macs + 4 * k * crop * crop) / 1e9


@pytest.mark.parametrize("name", [n for n, v in VARIANTS.items() if v.family == "eomt"])
def test_gflops_per_window_in_the_fvcore_convention(name):
    """394.84 GMACs for one 512x512 window at 150 classes (ADE20K), 2175.50 for 1024x1024 at 19 (Cityscapes):
    the sum worked out by hand. No masked attention at inference (the released probabilities are 0), so the
    4 intermediate predictions cost nothing. (The paper's ADE20K table gives 721 per image: its windowed test
    runs about 1.8 such windows per validation image.)"""
    v = VARIANTS[name]
    k, crop = v.paper.official_classes, v.kwargs["crop"]
    counted = count_gmacs(meta_model(name, k), (crop, crop), convention="fvcore")["total"]
    assert counted == pytest.approx(_expected_gmacs(1024, 24, 16, crop, 100, 4, 4, k), rel=1e-9)
    assert counted == pytest.approx({512: 394.84, 1024: 2175.50}[crop], abs=0.01)


def test_loss_equals_hugging_face_criterion():
    """The head's loss is Mask2Former's criterion (tests/test_mask2former_loss.py) with the authors' weights
    (class 2, mask 5, dice 5, no-object 0.1, 12,544 points) over the final and each intermediate prediction.
    With the same seed and HF's order of random draws (blocks first, final last), it equals HF's training loss."""
    hf = _hf_model(1.0).train()
    model = transeg.create_model("eomt-dinov2-l16", num_classes=TINY["num_labels"], embed_dim=64, depth=4, num_heads=4,
                                 crop=64, num_queries=10, query_blocks=2, mask_annealing=None)
    from transeg.families.eomt.convert import authors_to_transeg, hf_to_authors

    model.load_state_dict(authors_to_transeg(hf_to_authors(hf.state_dict(), "hf"), "hf"))
    model.train()
    x = seeded_input((2, 3, 64, 64), 2)
    label = torch.randint(0, TINY["num_labels"], (2, 64, 64), generator=torch.Generator().manual_seed(3))
    label[0, :8] = 255
    targets = semantic_targets(label)
    torch.manual_seed(4)
    ref = hf(pixel_values=x, mask_labels=[t["masks"] for t in targets], class_labels=[t["labels"] for t in targets]).loss
    outputs = model(x)
    assert len(outputs["aux_outputs"]) == 2
    cfg = model.decode_head.loss_cfg
    torch.manual_seed(4)
    ours = sum(mask2former_loss(o, targets, TINY["num_labels"], **cfg)["loss"]
               for o in outputs["aux_outputs"] + [{"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"]}])
    assert ours.item() == pytest.approx(ref.item(), rel=1e-4)
    losses = model.loss(outputs, label)
    assert set(losses) == {"loss"} | {f"loss_{t}{s}" for t in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    losses["loss"].backward()
    assert model.backbone.queries.weight.grad.abs().sum() > 0


def test_mask_annealing_schedule():
    """The authors' per-block schedule: 1 before its start, (1 - progress)^0.9 between, 0 from its end; a training
    forward reads the schedule at the passes done so far, so the k-th step (0-based) uses iteration k."""
    schedule = MaskAnnealing((10, 20), (20, 30))
    assert schedule(0) == [1.0, 1.0] and schedule(20) == [0.0, 1.0] and schedule(30) == [0.0, 0.0]
    assert schedule(15)[0] == pytest.approx(0.5 ** 0.9)
    model = transeg.create_model("eomt-dinov2-l16", num_classes=3, embed_dim=32, depth=2, num_heads=2, crop=32,
                                 num_queries=4, query_blocks=1, mask_annealing=[[1], [3]]).train()
    seen = []
    for k in range(4):
        model.set_iteration(k)  # the engine's call before step k
        model(torch.randn(1, 3, 32, 32))
        seen.append(model.backbone._probs[0])
    assert seen == [1.0, 1.0, pytest.approx(0.5 ** 0.9), 0.0]
    assert int(model.backbone.mask_annealing_iter) == 4
    state = model.state_dict()  # a resumed run continues the schedule from the saved iteration
    fresh = transeg.create_model("eomt-dinov2-l16", num_classes=3, embed_dim=32, depth=2, num_heads=2, crop=32,
                                 num_queries=4, query_blocks=1, mask_annealing=[[1], [3]])
    fresh.load_state_dict(state)
    assert fresh.backbone._iter == 4 and fresh.backbone._probs == [0.0]


def _authors_two_stage(step, total, w1, w2, power, vit):
    """tue-mps/eomt's TwoStageWarmupPolySchedule.get_lr, written out per case from its definition."""
    if not vit:
        return step / w1 if step < w1 else (1 - (step - w1) / (total - w1)) ** power
    if step < w1:
        return 0.0
    if step < w1 + w2:
        return (step - w1) / w2
    return (1 - (step - w1 - w2) / (total - w1 - w2)) ** power


def test_two_stage_warmup_is_the_authors_schedule_on_the_encoder_split():
    """two_stage_warmup [W1, W2]: the encoder's parameters (the ViT: patch embedding, tokens, blocks, final norm) wait
    at 0 for W1 and rise over W2; the rest (queries, class and mask head) rise over W1; each then decays poly(0.9)
    over what is left. Checked against the authors' schedule at every iteration of a 50-iteration run with
    W = (10, 15), boundaries included (factor 0 at 0 and at 10 for the encoder, 1 where each warm-up ends), and on
    the DINOv3 recipe's (2000, 3000) over 20,208 at 6 points."""
    from transeg.engine.optim import build_optimizer, build_scheduler, two_stage_factor

    for stages, total, steps in [((10, 15), 50, range(51)), ((2000, 3000), 20208, (0, 1999, 2000, 4999, 5000, 20207))]:
        for vit in (False, True):
            for step in steps:
                expected = _authors_two_stage(step, total, *stages, 0.9, vit)
                assert two_stage_factor(step, total, 0.9, 0.0, stages, vit) == pytest.approx(expected, abs=1e-12)
    model = transeg.create_model("eomt-dinov2-l16", num_classes=3, embed_dim=32, depth=2, num_heads=2, crop=32,
                                 num_queries=4, query_blocks=1, mask_annealing=None)
    optimizer = build_optimizer(model, lr=1.0, weight_decay=0.05, custom_keys={}, split_encoder=True)
    names = {n for g in optimizer.param_groups if not g["encoder"] for n, p in model.named_parameters()
             if any(p is q for q in g["params"])}
    assert names == {n for n, _ in model.named_parameters() if not n.startswith("backbone.")} | {"backbone.queries.weight"}
    scheduler = build_scheduler(optimizer, 50, 0.9, two_stage_warmup=[10, 15])
    for _ in range(12):
        optimizer.step()
        scheduler.step()
    lrs = {g["encoder"]: g["lr"] for g in optimizer.param_groups}
    assert lrs[True] == pytest.approx(2 / 15) and lrs[False] == pytest.approx((1 - 2 / 40) ** 0.9)


def test_tiny_eomt_trains_through_the_cli(tmp_path):
    """The CLI training path: set loss with deep supervision, annealing over the 6 steps, the two-stage warm-up
    [2, 2]: the encoder's lr, which the log reports, 0 for 2 iterations, 1/2 and 1 over the next 2, then
    poly), checkpoint round trip."""
    from conftest import TINY_DATA
    from transeg.cli import main

    args = dict(embed_dim=64, depth=4, num_heads=4, crop=32, num_queries=10, query_blocks=2, num_points=256,
                mask_annealing=[[1, 2], [3, 5]])
    out = tmp_path / "run"
    assert main(["train", "--model", "eomt-dinov2-l16", "--data", TINY_DATA, "--out", str(out), "--iters", "6",
                 "--batch-size", "2", "--device", "cpu", "--set", f"model_args={json.dumps(args)}",
                 "two_stage_warmup=[2,2]", "log_interval=1", "eval_interval=6", "ckpt_interval=6", "lr=1e-3"]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    # the lr each record reports is the encoder's for the iteration after it (power 1: linear decay over 6 - 4 = 2)
    assert [r["lr"] for r in records if "loss" in r] == pytest.approx([0, 0, 5e-4, 1e-3, 5e-4, 0], abs=1e-12)
    model = transeg.load(out / "model.safetensors")
    assert model.backbone._probs == [0.0, 0.0] and model.backbone._iter == 6
    assert model.predict(torch.randn(1, 3, 32, 32)).shape == (1, 32, 32)


@pytest.mark.parametrize("name", ["eomt-dinov2-l16", "eomt-dinov3-l16"])
def test_bf16_and_compiled_inference_and_bf16_training(name):
    """The serving paths on a tiny EoMT (64x96, so the windows and RoPE grids are not square): native bf16 weights
    keep the semantic scores within 2% of their largest value and the argmax on >= 98% of pixels (bf16 keeps 8
    significant bits; measured 0.8e-2 / 0.6e-2 of ~1.7 and 99.4 / 98.9%); torch.compile with weight freezing
    equals eager to 1e-5 (fusion reorders float sums only; measured 4.8e-7, DINOv3 only in the default run: a
    compile costs ~20 s of CPU). A training step under bf16 autocast with masked attention on gives a finite loss
    and gradients on the queries."""
    import copy

    torch.manual_seed(0)
    model = transeg.create_model(name, num_classes=5, embed_dim=64, depth=4, num_heads=4, crop=64, num_queries=10,
                                 query_blocks=2, mask_annealing=None, num_points=64).eval()
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fp32 = model.logits(x)
        bf16 = copy.deepcopy(model).optimize_for_inference(torch.bfloat16).logits(x)
        assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape == (1, 5, 64, 96)
        assert (bf16 - fp32).abs().max().item() <= 0.02 * fp32.abs().max().item()
        assert (bf16.argmax(1) == fp32.argmax(1)).float().mean().item() >= 0.98
        if name == "eomt-dinov3-l16":
            compiled = copy.deepcopy(model).optimize_for_inference(compile=True)
            assert (compiled.logits(x) - fp32).abs().max().item() <= 1e-5
    model.train()
    model.backbone.attn_mask_probs.fill_(1.0)
    model.backbone._probs = [1.0, 1.0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(model(torch.randn(2, 3, 64, 64)), torch.randint(0, 5, (2, 64, 64)))["loss"]
    loss.backward()
    assert math.isfinite(loss.item()) and model.backbone.queries.weight.grad.abs().sum().item() > 0


def test_exports_at_a_static_size():
    """torch.export (what the ONNX exporter traces) takes the released model at one window size: no masked
    attention, no data-dependent branch; the exported program equals eager."""
    model = transeg.create_model("eomt-dinov2-l16", num_classes=5, embed_dim=64, depth=4, num_heads=4, crop=64,
                                 num_queries=10, query_blocks=2, mask_annealing=None).eval()
    x = torch.randn(1, 3, 64, 64)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        assert (program.module()(x) - model(x)).abs().max() < 1e-5


def test_backbone_weights_read_timm_dinov2(tmp_path):
    """DINOv2 in timm's layout (patch 14, position embeddings for the patches only, registers, LayerScale) initialises
    a patch-16 EoMT: the kernel PI-resized (a 14x14 patch and its bicubic 16x16 resize embed to within 1e-3 of each
    other), the 3x3 position grid resized to 2x2; the queries keep their own initialisation."""
    from transeg.convert import load_backbone_weights

    kw = dict(num_classes=3, embed_dim=32, depth=2, num_heads=2, num_queries=4, query_blocks=1, mask_annealing=None)
    source = transeg.create_model("eomt-dinov2-l16", patch_size=14, crop=42, **kw).backbone.state_dict()
    dinov2 = {k: v for k, v in source.items() if k not in ("queries.weight", "attn_mask_probs", "mask_annealing_iter")}
    torch.save(dinov2, tmp_path / "dinov2.pth")
    model = transeg.create_model("eomt-dinov2-l16", crop=32, **kw)
    queries = model.backbone.queries.weight.detach().clone()
    load_backbone_weights(model, tmp_path / "dinov2.pth")
    assert torch.equal(model.backbone.queries.weight, queries)
    assert torch.equal(model.backbone.blocks[1].ls2.gamma, dinov2["blocks.1.ls2.gamma"])
    assert model.backbone.pos_embed.shape == (1, 4, 32)
    x = torch.randn(2, 3, 14, 14)
    x16 = F.interpolate(x, size=(16, 16), mode="bicubic", antialias=True, align_corners=False)
    old = F.conv2d(x, dinov2["patch_embed.proj.weight"])
    new = F.conv2d(x16, model.backbone.patch_embed.proj.weight)
    assert (old - new).abs().max() < 1e-3


# DINOv3: the same tiny model with HF's EomtDinov3 (RoPE theta 100 on the patches, no position embeddings, q/v biases
# without a key bias, MLP width 256 = 4 x 64 as in ViT-L).
TINY_V3 = dict(TINY, intermediate_size=256)


def _hf_dinov3_model(probs, seed=0, **config):
    from transformers import EomtDinov3Config, EomtDinov3ForUniversalSegmentation

    torch.manual_seed(seed)
    hf = EomtDinov3ForUniversalSegmentation(EomtDinov3Config(**TINY_V3, **config))
    state = hf.state_dict()
    shapes = [(k, v.shape) for k, v in state.items() if k not in ("attn_mask_probs", "criterion.empty_weight")]
    state.update(seeded_state_dict(shapes, seed))
    state["attn_mask_probs"] = torch.full((TINY_V3["num_blocks"],), float(probs))
    hf.load_state_dict(state)
    return hf


@pytest.mark.parametrize("probs", [0.0, 1.0], ids=["released-no-mask", "masked-attention"])
def test_dinov3_logits_equal_hugging_face(probs, tmp_path):
    """HF's eomt_dinov3 (save_pretrained) through `transeg convert --from eomt --model eomt-dinov3-l16`, with what the
    weights and config show (width 64, 4 blocks, 4 heads, image_size 64, rope_theta 100) as overrides: mask logits, class logits
    and full-resolution semantic scores within 1e-4 of HF. The bound: float32 rounding of a 4-block model whose RoPE
    angles are computed in another order (ours rotates the halves of each head directly, HF by rotate_half on a
    tiled table) and, with masked attention, HF's additive -3.4e38 mask against our boolean one. Measured (mask /
    class logits / scores): 1.2e-5 / 7e-7 / 1.4e-6 released, 8.6e-6 / 6.6e-7 / 1.2e-6 masked, |mask logit| <= 16.2."""
    from transeg.cli import main
    from transeg.convert.mmseg import match_variant

    # at the released shapes the weights' lack of position embeddings (rope_theta from the config) picks DINOv3
    real = dict(embed_dim=1024, depth=24, patch_size=16, crop=512)
    assert match_variant("eomt", "-", rope_theta=100.0, **real) == "eomt-dinov3-l16"
    assert match_variant("eomt", "-", rope_theta=None, **real) == "eomt-dinov2-l16"
    hf = _hf_dinov3_model(probs).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.safetensors"), "--from", "eomt",
                 "--model", "eomt-dinov3-l16"]) == 0  # the tiny shapes match no variant: named, as for DINOv2
    model = transeg.load(tmp_path / "m.safetensors").eval()
    assert model.meta["variant"] == "eomt-dinov3-l16"
    assert model.backbone.pos_embed is None and model.backbone.rope.theta == 100.0
    assert model.backbone.blocks[0].attn.qkv.bias is None  # q_bias / v_bias only
    assert model.backbone._probs == [probs] * TINY_V3["num_blocks"]
    x = seeded_input((2, 3, 64, 64), 1)
    with torch.no_grad():
        ref = hf(pixel_values=x)
        out = model.decode_head.decode(model.backbone(x))
        scores = model.logits(x)
    assert (out["pred_masks"] - ref.masks_queries_logits).abs().max() < 1e-4
    assert (out["pred_logits"] - ref.class_queries_logits).abs().max() < 1e-4
    masks = F.interpolate(ref.masks_queries_logits, size=(64, 64), mode="bilinear", align_corners=False)
    expected = torch.einsum("bqhw,bqc->bchw", masks.sigmoid(), ref.class_queries_logits.softmax(-1)[..., :-1])
    assert (scores - expected).abs().max() < 1e-4
    # RoPE really acts: the same weights with the patches' rotation off give other masks
    model.backbone.rope = None
    with torch.no_grad():
        plain = model.decode_head.decode(model.backbone(x))["pred_masks"]
    assert (plain - ref.masks_queries_logits).abs().max() > 1e-2


# The authors' DINOv3 layout, from their code (models/vit.py's transformers_to_timm: transformers' DINOv3ViTModel under
# network.encoder.backbone with `embeddings` renamed `patch_embed` and `layer` renamed `blocks`; models/eomt.py: q,
# class_head, mask_head (Sequential 0/2/4), upscale.i.{conv1,conv2,norm}), as (HF eomt_dinov3 key, their key, the
# DINOv3ViTModel key the encoder's delta is taken against).
_AUTHORS_V3 = [(r"embeddings\.(.+)", r"network.encoder.backbone.patch_embed.\1", r"embeddings.\1"),
               (r"layers\.(\d+)\.(.+)", r"network.encoder.backbone.blocks.\1.\2", r"layer.\1.\2"),
               (r"layernorm\.(.+)", r"network.encoder.backbone.norm.\1", r"norm.\1"),
               (r"query\.weight", "network.q.weight", None), (r"class_predictor\.(.+)", r"network.class_head.\1", None),
               (r"upscale_block\.block\.(\d+)\.(conv[12])\.(.+)", r"network.upscale.\1.\2.\3", None),
               (r"upscale_block\.block\.(\d+)\.layernorm2d\.(.+)", r"network.upscale.\1.norm.\2", None),
               (r"mask_head\.fc1\.(.+)", r"network.mask_head.0.\1", None),
               (r"mask_head\.fc2\.(.+)", r"network.mask_head.2.\1", None),
               (r"mask_head\.fc3\.(.+)", r"network.mask_head.4.\1", None),
               (r"(attn_mask_probs|criterion\.empty_weight)", r"network.\1", None)]


def _dinov3_base(tmp_path, width=64, seed=7):
    """Meta's DINOv3 weights in small: a seeded transformers DINOv3ViTModel, saved as the Hub folder is."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    base = DINOv3ViTModel(DINOv3ViTConfig(hidden_size=width, num_hidden_layers=4, num_attention_heads=4,
                                          intermediate_size=4 * width, num_register_tokens=4, image_size=64, patch_size=16))
    state = base.state_dict()
    state.update(seeded_state_dict([(k, v.shape) for k, v in state.items()], seed))
    base.load_state_dict(state)
    base.save_pretrained(tmp_path / f"dinov3-{width}")
    return tmp_path / f"dinov3-{width}", {k.removeprefix("model."): v for k, v in base.state_dict().items()}


def _authors_dinov3_delta(hf, base):
    """HF's model written as the authors release it: encoder weights minus the base's, the rest whole."""
    import re

    out = {"network.encoder.pixel_mean": torch.zeros(1, 3, 1, 1), "network.encoder.pixel_std": torch.zeros(1, 3, 1, 1)}
    for key, value in hf.state_dict().items():
        pattern, target, base_key = next(r for r in _AUTHORS_V3 if re.fullmatch(r[0], key))
        out[re.sub(pattern, target, key)] = value - base[re.sub(pattern, base_key, key)] if base_key else value
    return {"state_dict": out}


def test_dinov3_authors_delta_files_convert_with_the_base_weights(tmp_path):
    """The authors' DINOv3 files hold the encoder as deltas to Meta's DINOv3 weights. `transeg convert --from eomt
    --base DINOV3_FOLDER` adds them back: the model's mask / class logits equal HF's (the same weights whole) within
    1e-4 (measured 1.0e-5 / 1.1e-6: float32 rounding of (w - b) + b and the RoPE order, as in the HF test above), with
    the head count, LayerNorm eps (1e-5, not HF EoMT's default 1e-6: 7e-3 apart) and RoPE theta read from the base's
    config.json. Without --base, with a base of another width, a broken config.json beside it, an output path
    inside the base folder, or with --base on a whole file, the converter says so in one line (exit 2) and writes
    nothing."""
    from transeg.cli import main

    hf = _hf_dinov3_model(0.0, layer_norm_eps=1e-5).eval()  # the authors' encoder is Meta's, with its config's eps
    base_dir, base = _dinov3_base(tmp_path)
    torch.save(_authors_dinov3_delta(hf, base), tmp_path / "pytorch_model.bin")
    out = tmp_path / "m.safetensors"
    argv = ["convert", str(tmp_path / "pytorch_model.bin"), str(out), "--from", "eomt", "--model", "eomt-dinov3-l16"]
    assert main(argv + ["--base", str(base_dir)]) == 0
    model = transeg.load(out).eval()
    assert model.backbone.rope.theta == 100.0 and model.backbone.blocks[0].attn.num_heads == 4
    x = seeded_input((2, 3, 64, 64), 1)
    with torch.no_grad():
        ref, got = hf(pixel_values=x), model.decode_head.decode(model.backbone(x))
    assert (got["pred_masks"] - ref.masks_queries_logits).abs().max() < 1e-4
    assert (got["pred_logits"] - ref.class_queries_logits).abs().max() < 1e-4
    # the base really is added: the class token is HF's (base + delta, up to float32 rounding), and the delta alone
    # would be off by the base's token (seeded values of order 1, so more than 0.1 somewhere)
    assert (model.backbone.cls_token - hf.state_dict()["embeddings.cls_token"]).abs().max() < 1e-6
    assert base["embeddings.cls_token"].abs().max() > 0.1
    out.unlink()
    # the output may not land on an input: Meta's weights in the base folder stay as they were
    weights = (base_dir / "model.safetensors").read_bytes()
    assert main(argv[:2] + [str(base_dir / "model.safetensors")] + argv[3:] + ["--base", str(base_dir)]) == 2
    assert (base_dir / "model.safetensors").read_bytes() == weights
    (base_dir / "config.json").write_text("{not json")
    assert main(argv + ["--base", str(base_dir)]) == 2 and not out.exists()
    other_dir, _ = _dinov3_base(tmp_path, width=32)
    hf.save_pretrained(tmp_path / "hf")
    for extra, message in [([], "deltas to Meta's DINOv3 weights"), (["--base", str(other_dir)], "of another size"),
                           (["--base", str(tmp_path / "nope")], "no such file")]:
        assert main(argv + extra) == 2 and not out.exists(), extra
    from transeg.convert import convert
    from transeg.errors import TransegError

    with pytest.raises(TransegError, match="deltas to Meta's DINOv3 weights"):
        convert(tmp_path / "pytorch_model.bin", "eomt", model="eomt-dinov3-l16")
    with pytest.raises(TransegError, match=r"of another size"):
        convert(tmp_path / "pytorch_model.bin", "eomt", model="eomt-dinov3-l16", base=other_dir)
    hf_weights = tmp_path / "hf" / "model.safetensors"  # converting a file onto itself
    before = hf_weights.read_bytes()
    assert main(["convert", str(hf_weights), str(hf_weights), "--from", "eomt", "--model", "eomt-dinov3-l16"]) == 2
    assert hf_weights.read_bytes() == before
    with pytest.raises(TransegError, match="is whole"):
        convert(tmp_path / "hf", "eomt", model="eomt-dinov3-l16", base=base_dir)


def test_dinov3_backbone_weights_read_meta_hugging_face_layout(tmp_path):
    """`backbone_weights` given Meta's DINOv3 folder (transformers' DINOv3ViTModel) initialises EoMT-DINOv3's encoder:
    every encoder weight equal to the file's (q/k/v fused, the q and v biases kept apart as DINOv3 has no key bias),
    the queries and mask module left as they were."""
    from transeg.convert import load_backbone_weights

    base_dir, base = _dinov3_base(tmp_path)
    model = transeg.create_model("eomt-dinov3-l16", num_classes=5, embed_dim=64, depth=4, num_heads=4, crop=64,
                                 num_queries=10, query_blocks=2, mask_annealing=None)
    queries = model.backbone.queries.weight.detach().clone()
    load_backbone_weights(model, base_dir)
    b = model.backbone
    assert torch.equal(b.cls_token, base["embeddings.cls_token"]) and torch.equal(b.reg_token, base["embeddings.register_tokens"])
    assert torch.equal(b.blocks[2].attn.qkv.weight, torch.cat([base[f"layer.2.attention.{p}_proj.weight"] for p in "qkv"]))
    assert torch.equal(b.blocks[2].attn.q_bias, base["layer.2.attention.q_proj.bias"])
    assert torch.equal(b.blocks[2].attn.v_bias, base["layer.2.attention.v_proj.bias"])
    assert torch.equal(b.blocks[3].ls2.gamma, base["layer.3.layer_scale2.lambda1"])
    assert torch.equal(b.blocks[3].mlp.fc2.weight, base["layer.3.mlp.down_proj.weight"])
    assert torch.equal(b.norm.weight, base["norm.weight"]) and torch.equal(b.queries.weight, queries)


def test_rope_rotates_planes_by_the_dinov3_angles():
    """Worked by hand for head_dim 8 (2 planes per axis, frequencies 100^0 = 1 and 100^-0.5 = 0.1) on a 1x2 grid:
    the right patch's centre is (y, x) = (0, 0.5), so its planes turn by 2π·(0, 0, 0.5, 0.05); the channel pairs are
    (k, k + 4). Tokens before the patches stay, and rotation keeps each plane's norm."""
    from transeg.layers import RotaryPositionEmbedding, apply_rotary

    rope = RotaryPositionEmbedding(8, theta=100.0).eval()
    cos, sin = rope((1, 2))
    angles = 2 * math.pi * torch.tensor([[0.0, 0.0, -0.5, -0.05], [0.0, 0.0, 0.5, 0.05]])
    assert torch.allclose(cos, angles.cos(), atol=1e-6) and torch.allclose(sin, angles.sin(), atol=1e-6)
    x = torch.randn(1, 1, 3, 8)  # one prefix token, two patches
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 0, :], x[..., 0, :])
    a, b = x[0, 0, 2, 2], x[0, 0, 2, 6]  # plane 2 of the right patch: angle π
    assert torch.allclose(y[0, 0, 2, [2, 6]], torch.stack([-a, -b]), atol=1e-6)
    assert torch.allclose(y[..., :4].pow(2) + y[..., 4:].pow(2), x[..., :4].pow(2) + x[..., 4:].pow(2), atol=1e-5)


def test_hugging_face_class_names_are_carried(tmp_path):
    """`convert --from eomt` keeps a Hugging Face config.json's id2label as the class names (issue 33)."""
    from transeg.cli import main

    names = [f"class {i}" for i in range(TINY["num_labels"])]
    hf = EomtForUniversalSegmentation(EomtConfig(**TINY, id2label=dict(enumerate(names))))
    hf.save_pretrained(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.safetensors"), "--from", "eomt",
                 "--model", "eomt-dinov2-l16"]) == 0
    assert transeg.load(tmp_path / "m.safetensors").classes == names
