"""Every recipe under configs/ loads, says in its file name what it holds, builds its model (on the meta
device, at the dataset's class count), its optimizer groups and its augmentation, and is listed in the
README's recipe table."""
import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from transeg.data import DATASETS, TrainTransform
from transeg.engine import load_config
from transeg.engine.optim import param_groups
from transeg.engine.trainer import build_model
from transeg.registry import VARIANTS, families

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "configs").glob("*/*.yaml"))
NAME = re.compile(r"^(?P<model>.+)_(?P<data>[a-z0-9-]+?)-(?P<crop>\d+(?:x\d+)?)_(?P<iters>\d+)k$")


def test_there_are_recipes_for_every_family():
    assert {p.parent.name for p in RECIPES} == set(families())


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_builds(path):
    cfg = load_config(path)
    m = NAME.match(path.stem)
    assert m, f"{path.name}: name should be MODEL_DATASET-CROP_ITERSk.yaml"
    assert cfg.model == m["model"] and cfg.model in VARIANTS and VARIANTS[cfg.model].family == path.parent.name
    dataset, _, root = cfg.data.partition(":")
    assert dataset.startswith(m["data"]) and dataset in DATASETS and root
    crop = [int(v) for v in m["crop"].split("x")] * (1 if "x" in m["crop"] else 2)
    assert cfg.crop_size == crop
    # the name rounds: Segmenter trains whole epochs (ADE20K: 64 x 2527 = 161,728 iterations for "160k")
    assert abs(cfg.iters - int(m["iters"]) * 1000) <= 0.02 * int(m["iters"]) * 1000
    classes = DATASETS[dataset].class_names
    with torch.device("meta"):  # ImageNet weights are the user's download: not loaded here
        model = build_model(dataclasses.replace(cfg, backbone_weights=None), SimpleNamespace(classes=classes, palette=[[0, 0, 0]] * len(classes)))
    assert model.num_classes == len(classes)
    groups = param_groups(model, cfg.lr, cfg.weight_decay, custom_keys=cfg.custom_keys)
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])
    TrainTransform(crop_size=cfg.crop_size, scale=cfg.scale, ratio_range=cfg.ratio_range,
                   cat_max_ratio=cfg.cat_max_ratio, photometric=cfg.photometric,
                   mean=model.meta["mean"], std=model.meta["std"])
    assert cfg.test_mode in ("whole", "slide") and (cfg.test_mode == "whole" or (cfg.test_crop and cfg.test_stride))


def test_readme_lists_every_recipe():
    readme = (ROOT / "README.md").read_text()
    missing = [p.name for p in RECIPES if p.name not in readme]
    assert not missing, f"README's recipe table lacks {missing}"


def test_train_runs_a_recipe_with_overrides(tmp_path):
    """`transeg train RECIPE --set ...`: the recipe's own settings (AdamW 6e-5, head lr x10, ...) stay,
    the overrides shrink it to a miniature ADE20K, and the resolved config is saved with the run."""
    import json

    import yaml

    from conftest import TINY
    from test_benchmarks import make_ade20k
    from transeg.cli import main

    data = make_ade20k(tmp_path / "ADEChallengeData2016")
    recipe = ROOT / "configs" / "segformer" / "segformer-b0_ade20k-512_160k.yaml"
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(out), "--device", "cpu", "--workers", "0", "--set",
                 f"data=ade20k:{data}", "iters=2", "global_batch=2", "crop_size=[32,32]", "scale=[96,32]",
                 "test_scale=[96,32]", "backbone_weights=null", f"model_args={json.dumps(TINY)}", "eval_interval=2",
                 "ckpt_interval=2", "warmup_iters=1"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 6e-5 and saved["custom_keys"]["head"] == {"lr_mult": 10.0} and saved["iters"] == 2
    assert saved["data"] == f"ade20k:{data}" and saved["ms_scales"] == [0.75, 0.875, 1.0, 1.125, 1.25]
