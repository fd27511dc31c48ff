"""Training configuration: one flat dataclass, read from YAML, overridden with `--set key=value`."""
import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from ..errors import TransegError


@dataclass
class TrainConfig:
    # model
    model: str = "segformer-b0"
    model_args: dict = field(default_factory=dict)    # constructor overrides, e.g. {drop_path_rate: 0.2}
    pretrained: Optional[str] = None                   # a transeg .safetensors to start from
    backbone_weights: Optional[str] = None             # ImageNet encoder weights (mit_b2.pth, EFT_T.pth, ...)
    # data; None = the built-in synthetic set. Sizes left at None take the dataset's defaults.
    data: Optional[str] = None
    crop_size: Optional[list] = None                   # [h, w]
    scale: Optional[list] = None                       # [long, short] target of the random resize (mmseg img_scale)
    ratio_range: list = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75
    photometric: bool = True
    # optimisation (SegFormer's recipe: AdamW 6e-5, wd 0.01, head lr x10, norms without decay, poly + warm-up)
    iters: int = 160_000
    batch_size: int = 16                               # per optimizer step and process, before accumulation
    global_batch: Optional[int] = None                 # the paper's total batch: sets batch_size to
                                                       # global_batch / (processes x accum_steps)
    accum_steps: int = 1                               # micro-batches of batch_size per optimizer step
    optimizer: str = "adamw"
    nesterov: bool = False                             # SGD only (Segmenter trains with Nesterov momentum 0.9)
    lr: float = 6e-5
    weight_decay: float = 0.01
    custom_keys: dict = field(default_factory=lambda: {"head": {"lr_mult": 10.0}, "norm": {"decay_mult": 0.0},
                                                       "pos_block": {"decay_mult": 0.0}})
    sync_bn: bool = False                              # BatchNorm statistics over all processes (DDP on CUDA)
    clip_grad_norm: Optional[float] = None             # max L2 norm of all gradients (Mask2Former: 0.01)
    compile: bool = False                              # torch.compile the model (the first steps compile;
                                                       # gains in benchmarks/train_step.py, BENCHMARKS.md)
    power: float = 1.0
    min_lr_ratio: float = 0.0
    warmup_iters: int = 1500
    warmup_ratio: float = 1e-6
    ohem: Optional[dict] = None                        # OHEM pixel sampling, e.g. {thresh: null, min_kept: 100000}
    loss_reduction: str = "all"                        # "all": mmseg 0.x mean over all pixels; "valid": over labelled ones
    amp: str = "no"                                    # no | bf16 | fp16 | auto (bf16 where the hardware has it)
    # test protocol used for periodic evaluation and stored in the checkpoint
    test_mode: str = "whole"
    test_scale: Optional[list] = None
    test_crop: Optional[list] = None
    test_stride: Optional[list] = None
    size_divisor: Optional[int] = 32
    min_short_side: Optional[int] = None               # test images whose short side is below it are enlarged
                                                       # to it (Segmenter's windows; SegViT's mmseg min_size)
    # the paper's multi-scale + flip test (`transeg eval --ms`); ratios of the single-scale size
    ms_scales: list = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    ms_flip: bool = True
    # bookkeeping
    out: str = "runs/train"
    eval_interval: int = 16_000
    ckpt_interval: int = 16_000
    log_interval: int = 50
    tensorboard: bool = False                          # also log to out/tb (needs the `tensorboard` extra)
    workers: int = 2
    seed: int = 0
    device: str = "auto"

    def to_dict(self):
        return dataclasses.asdict(self)


# `transeg train` with no config and no data: settings that train the built-in synthetic set well in
# minutes on a laptop CPU (from scratch, so a higher lr and a short warm-up than the papers' ImageNet
# fine-tuning)
QUICKSTART = dict(model="segformer-b0", iters=2500, batch_size=8, lr=1e-3, warmup_iters=100, ratio_range=[0.75, 1.5],
                  amp="auto", workers=0, eval_interval=500, ckpt_interval=500, log_interval=25, out="runs/train")


def resolve(cfg: TrainConfig, dataset=None) -> TrainConfig:
    """Fill sizes left at None from the data: the synthetic set trains at its own image size
    (no rescale at ratio 1); folders get the papers' ADE20K sizes (crop 512, resize to (2048, 512))."""
    synthetic = not cfg.data or str(cfg.data).startswith("synthetic")
    if synthetic:
        h, w = getattr(dataset, "size", (128, 128))
        crop, scale = [h, w], [4 * max(h, w), min(h, w)]
    else:
        crop, scale = [512, 512], [2048, 512]
    for key, value in (("crop_size", crop), ("scale", scale), ("test_scale", scale)):
        if getattr(cfg, key) is None:
            setattr(cfg, key, list(value))
    return cfg


# what other toolboxes call our keys, for the "did you mean" of an unknown key
_ALIASES = {"learning_rate": "lr", "base_lr": "lr", "max_iters": "iters", "num_iters": "iters", "iterations": "iters",
            "samples_per_gpu": "batch_size", "batch": "batch_size", "ims_per_batch": "global_batch", "crop": "crop_size",
            "img_scale": "scale", "dataset": "data", "data_root": "data", "fp16": "amp", "grad_clip": "clip_grad_norm",
            "warmup": "warmup_iters", "checkpoint": "pretrained", "output_dir": "out", "work_dir": "out"}


def _check_keys(keys, source):
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in keys:
        if key not in names:
            near = [_ALIASES[key.lower()]] if key.lower() in _ALIASES else difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise TransegError(f"{source}: unknown key {key!r}{hint}")


def _coerce(key, value, source):
    """Give `value` the type of TrainConfig.<key>: YAML reads 1e-3 as a string (floats need a dot in
    YAML 1.1) and users write iters: 1000.0; both are accepted, nonsense gets a clear error."""
    kind = {f.name: f.type for f in dataclasses.fields(TrainConfig)}[key]
    if value is None or kind in (str, Optional[str]):
        return value
    base = kind.__args__[0] if getattr(kind, "__args__", None) and type(None) in kind.__args__ else kind
    try:
        if base is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
                return value.lower() in ("true", "yes")
            if isinstance(value, bool):
                return value
            raise ValueError
        if base is int:
            number = float(value)
            if number != int(number):
                raise ValueError
            return int(number)
        if base is float:
            return float(value)
        if base is list and isinstance(value, (list, tuple)):
            return list(value)
        if base is dict and isinstance(value, dict):
            return value
        if base in (list, dict):
            raise ValueError
    except (TypeError, ValueError):
        name = getattr(base, "__name__", str(base))
        raise TransegError(f"{source}: {key} must be a{'n' if name[0] in 'aeiou' else ''} {name}, got {value!r}") from None
    return value


def load_config(path=None, overrides=(), **fields) -> TrainConfig:
    """TrainConfig from an optional YAML file, then keyword fields, then `key=value` overrides."""
    values = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TransegError(f"{path}: no such config file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise TransegError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise TransegError(f"{path}: expected a mapping of keys to values")
        _check_keys(values, path)
        values = {k: _coerce(k, v, path) for k, v in values.items()}
    values.update({k: v for k, v in fields.items() if v is not None})
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise TransegError(f"--set {item}: expected key=value")
        _check_keys([key], "--set")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        values[key] = _coerce(key, value, f"--set {key}")
    try:
        return TrainConfig(**values)
    except TypeError as e:
        raise TransegError(f"config: {e}") from None
