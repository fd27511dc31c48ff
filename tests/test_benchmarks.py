"""The benchmark datasets: miniature copies of each official layout are written here, converted with
`transeg data prepare` where the real data needs it, read through the real readers, trained on for a
few iterations and evaluated."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import transeg
from conftest import TINY
from transeg.cli import main
from transeg.data import build_dataset
from transeg.data import classes as C
from transeg.engine import TrainConfig, train

H, W = 24, 32


def _image(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(path)


def _mask(path, values):
    """A mask made of vertical bands, one per value (so every value occurs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bands = np.array_split(np.arange(W), len(values))
    m = np.zeros((H, W), dtype=np.uint8)
    for cols, v in zip(bands, values):
        m[:, cols] = v
    Image.fromarray(m, mode="L").save(path)
    return m


def _bands(values):
    return [v for cols, v in zip(np.array_split(np.arange(W), len(values)), values) for _ in cols]


def _first_row(dataset, index=0):
    return dataset[index]["label"][0].tolist()


def make_ade20k(root):
    for split, n in (("training", 3), ("validation", 2)):
        for i in range(n):
            _image(root / "images" / split / f"ADE_{split}_{i:08d}.jpg", i)
            _mask(root / "annotations" / split / f"ADE_{split}_{i:08d}.png", [0, 1, 150, 13])
    return root


def make_cityscapes(root):
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            city = "aachen" if split == "train" else "frankfurt"
            _image(root / "leftImg8bit" / split / city / f"{city}_{i:06d}_000019_leftImg8bit.png", i)
            # road, car, bicycle, unlabeled, ego vehicle (label ids run 0..33)
            _mask(root / "gtFine" / split / city / f"{city}_{i:06d}_000019_gtFine_labelIds.png", [7, 26, 33, 0, 1])
    return root


def make_coco164k(root):
    for split, n in (("train2017", 3), ("val2017", 2)):
        for i in range(n):
            _image(root / "images" / split / f"{i:012d}.jpg", i)
            # person, street sign (never annotated), banner (first stuff), wood (last), unlabelled
            _mask(root / "annotations" / split / f"{i:012d}.png", [0, 11, 91, 181, 255])
    return root


def make_pascal_context(root):
    voc = root / "VOC2010"
    (voc / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    for split, names in (("train", ["2008_000001", "2008_000002", "2008_000003"]), ("val", ["2008_000004", "2008_000005"])):
        for i, name in enumerate(names):
            _image(voc / "JPEGImages" / f"{name}.jpg", i)
            _mask(voc / "SegmentationClassContext" / f"{name}.png", [0, 1, 59, 15])
        (voc / "ImageSets" / "SegmentationContext" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def make_coco10k(root):
    """The prepared layout (what `transeg data prepare coco-stuff10k` writes)."""
    for split, n in (("train2014", 3), ("test2014", 2)):
        for i in range(n):
            _image(root / "images" / split / f"COCO_train2014_{i:012d}.jpg", i)
            _mask(root / "annotations" / split / f"COCO_train2014_{i:012d}_labelTrainIds.png", [0, 80, 170, 255])
    return root


def test_ade20k_reads_with_reduce_zero_label(tmp_path):
    """ADE20K's 0 ("other") is ignored and 1..150 become 0..149 (mmseg's reduce_zero_label)."""
    root = make_ade20k(tmp_path / "ADEChallengeData2016")
    ds = build_dataset(str(root), "train")
    assert type(ds).__name__ == "ADE20K" and len(ds) == 3 and len(build_dataset(str(root), "val")) == 2
    assert ds.classes[0] == "wall" and ds.classes[149] == "flag" and len(ds.classes) == 150
    assert _first_row(ds) == _bands([255, 0, 149, 12])
    assert ds[0]["image"].shape == (3, H, W)


def test_cityscapes_raw_ids_and_prepared_train_ids_agree(tmp_path, capsys):
    """labelIds 7 (road), 26 (car), 33 (bicycle) -> train ids 0, 13, 18; 0 (unlabeled) and 1 (ego
    vehicle) -> 255. Read on the fly from labelIds, and after `transeg data prepare cityscapes` from
    the written *_labelTrainIds.png: the same labels."""
    raw = make_cityscapes(tmp_path / "cityscapes")
    on_the_fly = build_dataset(f"cityscapes:{raw}", "train")
    assert on_the_fly.raw_ids and _first_row(on_the_fly) == _bands([0, 13, 18, 255, 255])
    assert on_the_fly.palette[0] == [128, 64, 128]  # the official road colour
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "cityscapes", str(raw), str(out)]) == 0
    assert "5 label maps written" in capsys.readouterr().out
    prepared = build_dataset(str(out), "val")
    assert not prepared.raw_ids and len(prepared) == 2
    trainids = np.asarray(Image.open(out / "gtFine/val/frankfurt/frankfurt_000000_000019_gtFine_labelTrainIds.png"))
    assert trainids[0].tolist() == _bands([0, 13, 18, 255, 255])
    assert torch.equal(prepared[0]["label"], build_dataset(str(raw), "val")[0]["label"])


def test_coco_stuff164k_maps_182_ids_to_171_classes(tmp_path):
    """COCO-Stuff ids (0-based): 0 person -> 0, 11 street sign (never annotated) -> ignore, 91 banner
    -> 80 (the first stuff class), 181 wood -> 170; 255 stays ignore. Prepared files agree."""
    raw = make_coco164k(tmp_path / "coco_stuff164k")
    ds = build_dataset(str(raw), "train")
    assert type(ds).__name__ == "COCOStuff164k" and len(ds.classes) == 171
    assert _first_row(ds) == _bands([0, 255, 80, 170, 255])
    assert ds.classes[80] == "banner" and ds.classes[170] == "wood"
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "coco-stuff164k", str(raw), str(out)]) == 0
    assert _first_row(build_dataset(str(out), "val")) == _bands([0, 255, 80, 170, 255])


def test_coco_stuff10k_prepare_from_mat(tmp_path):
    """cocostuff-10k-v1.1's .mat maps hold 1-based ids (0 = unlabelled): 1 person -> 0, 12 street
    sign -> ignore, 92 banner -> 80, 182 wood -> 170."""
    scipy_io = pytest.importorskip("scipy.io")
    raw = tmp_path / "cocostuff-10k-v1.1"
    (raw / "imageLists").mkdir(parents=True)
    names = {"train": ["COCO_train2014_000000000077", "COCO_train2014_000000000078"],
             "test": ["COCO_train2014_000000000079"]}
    for split, ns in names.items():
        (raw / "imageLists" / f"{split}.txt").write_text("\n".join(ns) + "\n")
        for i, n in enumerate(ns):
            _image(raw / "images" / f"{n}.jpg", i)
            s = np.zeros((H, W), dtype=np.uint16)
            for cols, v in zip(np.array_split(np.arange(W), 5), [1, 12, 92, 182, 0]):
                s[:, cols] = v
            (raw / "annotations").mkdir(exist_ok=True)
            scipy_io.savemat(raw / "annotations" / f"{n}.mat", {"S": s, "names": np.array(["x"], dtype=object)})
    out = tmp_path / "coco_stuff10k"
    assert main(["data", "prepare", "coco-stuff10k", str(raw), str(out)]) == 0
    train, val = build_dataset(str(out), "train"), build_dataset(str(out), "val")
    assert type(train).__name__ == "COCOStuff10k" and (len(train), len(val)) == (2, 1)
    assert _first_row(val) == _bands([0, 255, 80, 170, 255])


def test_pascal_context_60_and_59(tmp_path):
    """60 classes: 0 is "background", a class; 59 classes: background ignored, 1..59 -> 0..58."""
    root = make_pascal_context(tmp_path / "VOCdevkit")
    ds60 = build_dataset(str(root), "train")
    assert type(ds60).__name__ == "PascalContext" and len(ds60.classes) == 60 and ds60.classes[0] == "background"
    assert _first_row(ds60) == _bands([0, 1, 59, 15])
    ds59 = build_dataset(f"pascal-context-59:{root}", "val")
    assert len(ds59.classes) == 59 and _first_row(ds59) == _bands([255, 0, 58, 14])


def test_pascal_context_prepare_from_mat(tmp_path):
    """The PASCAL-Context release: 459-class LabelMap .mat files + labels.txt; the 59 classes keep
    their order (aeroplane = 1 ... wood = 59), every other class becomes background 0."""
    scipy_io = pytest.importorskip("scipy.io")
    voc = tmp_path / "VOC2010"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("2008_000001\n2008_000002\n")
    (voc / "ImageSets" / "Main" / "val.txt").write_text("2008_000003\n")
    # a labels.txt with the 59 names at scattered ids among others
    names = ["accordion"] + list(C.PASCAL_CONTEXT_59[::-1]) + ["zebra"]
    (voc / "labels.txt").write_text("".join(f"{i + 1}: {n}\n" for i, n in enumerate(names)))
    ids = {n: i + 1 for i, n in enumerate(names)}
    (voc / "trainval").mkdir()
    for i, name in enumerate(["2008_000001", "2008_000002", "2008_000003"]):
        _image(voc / "JPEGImages" / f"{name}.jpg", i)
        m = np.zeros((H, W), dtype=np.uint16)
        for cols, v in zip(np.array_split(np.arange(W), 4), [ids["accordion"], ids["aeroplane"], ids["wood"], ids["zebra"]]):
            m[:, cols] = v
        scipy_io.savemat(voc / "trainval" / f"{name}.mat", {"LabelMap": m})
    out = tmp_path / "context"
    assert main(["data", "prepare", "pascal-context", str(voc), str(out)]) == 0
    ds = build_dataset(str(out), "val")
    assert len(ds) == 1 and _first_row(ds) == _bands([0, 1, 59, 0])


def test_data_check_reports_values_and_frequencies(tmp_path, capsys):
    root = make_ade20k(tmp_path / "ADEChallengeData2016")
    assert main(["data", "check", str(root), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "2 image/mask pairs, sizes 32x24 .. 32x24" in out and "raw label values: 0-1, 13, 150" in out
    assert "ignored: 25.0% of pixels" in out  # one band of four is ADE's 0
    # a value outside the 150 classes names the file
    _mask(root / "annotations" / "validation" / "ADE_validation_00000001.png", [0, 151])
    assert main(["data", "check", str(root), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert "ADE_validation_00000001.png: label value 151 is outside the 150 classes of ADE20K" in err


@pytest.mark.parametrize("maker,spec", [(make_ade20k, "{root}"), (make_cityscapes, "{root}"),
                                        (make_coco164k, "{root}"), (make_coco10k, "{root}"),
                                        (make_pascal_context, "{root}"), (make_pascal_context, "pascal-context-59:{root}")],
                         ids=["ade20k", "cityscapes", "coco-stuff164k", "coco-stuff10k", "pascal-context",
                              "pascal-context-59"])
def test_train_and_evaluate_on_each_layout(tmp_path, maker, spec):
    """Two iterations of a tiny SegFormer on each miniature benchmark, then evaluation on its val split."""
    root = maker(tmp_path / "data")
    data = spec.format(root=root)
    k = len(build_dataset(data, "train").classes)
    cfg = TrainConfig(model="segformer-b0", model_args=TINY, data=data, iters=2, batch_size=2, lr=1e-3, warmup_iters=0,
                      crop_size=[32, 32], scale=[96, 32], test_scale=[96, 32], eval_interval=2, ckpt_interval=2,
                      log_interval=1, workers=0, device="cpu", out=str(tmp_path / "run"))
    result = train(cfg, progress=False, log=lambda *_: None)
    model = transeg.load(tmp_path / "run" / "model.safetensors")
    assert model.num_classes == k and 0.0 <= result["mIoU"] <= 1.0
    records = [json.loads(r) for r in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any("mIoU" in r for r in records)


def test_converted_checkpoint_without_names_gets_the_benchmark_classes(tmp_path):
    """A foreign file with no class names (the authors' Segmenter / Mask2Former files, a stripped mmseg
    file) takes the names of the benchmark with its class count: 19 -> Cityscapes, with its colours."""
    from transeg.convert import convert

    model = transeg.create_model("segformer-b0", num_classes=19)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "b0.pth")
    converted = convert(tmp_path / "b0.pth", "segformer")
    assert converted.classes[:3] == ["road", "sidewalk", "building"] and converted.classes[-1] == "bicycle"
    assert converted.meta["palette"][0] == [128, 64, 128]
    # and the released Cityscapes test: 1024 windows with stride 768 on the 2048x1024 image (the authors' released Cityscapes config)
    assert converted.protocol.describe() == \
        "slide (1024, 1024) stride (768, 768), resize keep-ratio to (2048, 1024), scales [1.0]"
    assert converted.protocol.ms_scales == (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


def test_raw_id_outside_the_dataset_names_the_file(tmp_path):
    """Raw Cityscapes labelIds stop at 33: a 40 is named with the file and what is allowed."""
    raw = make_cityscapes(tmp_path / "cityscapes")
    bad = raw / "gtFine/train/aachen/aachen_000001_000019_gtFine_labelIds.png"
    _mask(bad, [7, 40])
    ds = build_dataset(str(raw), "train")
    with pytest.raises(transeg.TransegError, match=r"aachen_000001_000019_gtFine_labelIds.png: label value 40 is outside "
                                                   r"the 19 classes of Cityscapes \(allowed the Cityscapes label ids 0..33"):
        ds[1]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_gpu_suite_smoke_runs_every_step_and_writes_its_tables(tmp_path):
    """`benchmarks/gpu_suite.py --smoke` (issue 32: one command for the whole GPU suite; on a CPU its small version)
    runs every step's script at tiny sizes and exits 0: each step leaves a markdown table in its NN-STEP.md and
    summary.md lists every step as ok, so a change to a benchmark script that breaks it fails here, not on the GPU
    machine whose minutes are scarce (all but precision.py's compiled contenders, which the smoke skips: a compile
    is 20-35 s on 2 cores; tests/test_compiled.py compiles the same path). Run again on the now full folder it refuses in one line with exit 2 and
    leaves the files as they were (it never writes over a user's files)."""
    suite = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"
    sys.path.insert(0, str(suite.parent))
    try:
        from gpu_suite import STEPS
    finally:
        sys.path.remove(str(suite.parent))
    out = tmp_path / "suite"
    run = subprocess.run([sys.executable, str(suite), "--out", str(out), "--smoke"], capture_output=True, text=True,
                         timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    for i, step in enumerate(STEPS, 1):
        stem = f"{i:02d}-{step.name}"
        table = (out / f"{stem}.md").read_text()
        assert "\n|---" in table and table.count("\n| ") >= 2, f"{stem}.md holds no table:\n{table}"
        assert f"| {stem} | ok |" in summary, summary
    before = sorted(p.name for p in out.iterdir())
    again = subprocess.run([sys.executable, str(suite), "--out", str(out), "--smoke"], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 2 and again.stdout == "" and len(again.stderr.strip().splitlines()) == 1
    assert "exists and is not an empty folder" in again.stderr
    assert sorted(p.name for p in out.iterdir()) == before
