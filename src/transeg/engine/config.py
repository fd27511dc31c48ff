"""Training configuration: one flat dataclass, read from YAML, overridden with `--set key=value`.

Every field carries its rule beside it (`field(metadata={"rule": ...})`): the values it takes, in the
words its error shows (`clip_grad_norm=-1: must be a number > 0 (or null for no clipping)`). The rules
are applied in one place, `validate`, which every way in goes through before any data is read or
model built: `TrainConfig(...)` on construction, `load_config` (naming the YAML file or `--set`), and
`resolve` once more at the start of training, with what only this machine can answer (the weight
files are checkpoints, the device exists). A new key gets a rule and with it the same treatment.
"""
import dataclasses
import difflib
import math
import numbers
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import yaml

from ..errors import TransegError


# ------------------------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class Rule:
    """What a key accepts. `test(value)` is True when the value is fine, False when it is not (the
    error then says "must be <allowed>"), or a sentence saying what exactly is wrong."""
    allowed: str
    test: Callable
    choices: tuple = ()  # for one_of: the names

    def problem(self, value):
        verdict = self.test(value)
        if verdict is True:
            return None
        return verdict if isinstance(verdict, str) else f"must be {self.allowed}"


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def whole(low, high=None, high_text=None):
    text = f"a whole number >= {low}" if high is None else f"a whole number in {low} .. {high_text or high}"
    return Rule(text, lambda v: _is_int(v) and v >= low and (high is None or v <= high))


def number(gt=None, ge=None, le=None):
    """A finite number with the given bounds."""
    if gt is not None and le is not None:
        text = f"a number in ({gt}, {le}]"
    elif ge is not None and le is not None:
        text = f"a number in [{ge}, {le}]"
    else:
        text = f"a number > {gt}" if gt is not None else f"a number >= {ge}"
    return Rule(text, lambda v: _is_number(v) and (gt is None or v > gt) and (ge is None or v >= ge)
                and (le is None or v <= le))


def one_of(*choices):
    return Rule(f"one of {', '.join(choices)}", lambda v: isinstance(v, str) and v in choices, choices)


def size_pair(names):
    """[h, w] or [long, short]: two whole numbers >= 1."""
    return Rule(f"{names}: two whole numbers >= 1",
                lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 1 for x in v))


def optional(rule, meaning):
    return Rule(f"{rule.allowed} (or null {meaning})", lambda v: v is None or rule.test(v))


def _text(what):
    return Rule(what, lambda v: isinstance(v, str) and v.strip() != "")


BOOL = Rule("true or false", lambda v: isinstance(v, bool))
MAPPING = Rule("a mapping of constructor arguments, e.g. {drop_path_rate: 0.2}",
               lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v))
RATIO_RANGE = Rule("[low, high]: two numbers with 0 < low <= high, e.g. [0.5, 2.0]",
                   lambda v: isinstance(v, list) and len(v) == 2 and all(_is_number(x) for x in v) and 0 < v[0] <= v[1])
SCALES = Rule("a list of ratios > 0, e.g. [0.75, 1.0, 1.25]",
              lambda v: isinstance(v, list) and len(v) > 0 and all(_is_number(x) and x > 0 for x in v))


def _ohem(v):
    if not isinstance(v, dict) or set(v) - {"thresh", "min_kept"}:
        return False
    thresh, kept = v.get("thresh", 0.7), v.get("min_kept", 100_000)
    return (thresh is None or (_is_number(thresh) and 0 <= thresh <= 1)) and _is_int(kept) and kept >= 1


TWO_STAGE = Rule("[iterations, iterations]: two whole numbers >= 0, e.g. [500, 1000]",
                 lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x >= 0 for x in v))
OHEM = Rule("{thresh: a probability in [0, 1] or null, min_kept: a whole number >= 1}", _ohem)


def _custom_keys(v):
    from .optim import custom_keys_problem

    return custom_keys_problem(v) or True


CUSTOM_KEYS = Rule("a mapping {part of a parameter name: {lr_mult: N, decay_mult: N}}", _custom_keys)


def _loss(v):
    from ..losses.pixel import check_terms

    try:
        check_terms(v)
    except TransegError as e:
        return str(e)
    return True


LOSS = Rule("a list of weighted pixel losses, e.g. [{type: ce, class_weight: auto}, {type: dice, weight: 0.5}]", _loss)


def _model(v):
    from ..registry import get_variant

    try:
        get_variant(str(v))
    except TransegError as e:
        return str(e)  # unknown model 'x' (did you mean ...?); `transeg models` lists them
    return isinstance(v, str)


def _device(v):
    import torch

    if not isinstance(v, str):
        return False
    if v == "auto":
        return True
    try:
        torch.device(v)
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


def _report_to(v):
    names = [v] if isinstance(v, str) else v
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return False
    unknown = [n for n in names if n not in TRACKERS]
    return f"{unknown[0]!r} is not a tracker transeg reports to ({', '.join(TRACKERS)})" if unknown else True


def _repo_id(v):
    from ..share import check_repo_id

    try:
        check_repo_id(v)
    except TransegError as e:
        return str(e).split(": ", 1)[1]
    return True


TRACKERS = ("tensorboard", "wandb", "mlflow")  # engine/trackers.py
REPORT_TO = Rule(f"a list of trackers among {', '.join(TRACKERS)}, e.g. [wandb, mlflow] ([] for none)", _report_to)
MODEL = Rule("a model variant of `transeg models`", _model)
DEVICE = Rule("auto, cpu, cuda or cuda:N", _device)
# auto: sized from this machine when the run starts (engine/samples.auto_workers: the augmentation's measured rate,
# the device, the cores this process may use)
WORKERS = Rule("auto or a whole number >= 0", lambda v: v == "auto" or (_is_int(v) and v >= 0))


def _f(default=None, rule=None, factory=None):
    """A field with its rule beside it."""
    if factory is not None:
        return field(default_factory=factory, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


# ---------------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    # model
    model: str = _f("segformer-b0", MODEL)
    model_args: dict = _f(rule=MAPPING, factory=dict)  # constructor overrides, e.g. {drop_path_rate: 0.2}
    pretrained: Optional[str] = _f(None, optional(_text("a transeg .safetensors file, a zoo name or a Hugging Face repo id"), "to start from scratch"))
    # ImageNet encoder weights (mit_b2.pth, EFT_T.pth, ...)
    backbone_weights: Optional[str] = _f(None, optional(_text("a path to ImageNet weights or a zoo ImageNet release"),
                                                        "for none"))
    # data; None = the built-in synthetic set. Sizes left at None take the dataset's defaults.
    data: Optional[str] = _f(None, optional(_text("a dataset folder or NAME:PATH"), "for the synthetic set"))
    crop_size: Optional[list] = _f(None, optional(size_pair("[h, w]"), "for the dataset's default"))
    # [long, short] target of the random resize (mmseg img_scale)
    scale: Optional[list] = _f(None, optional(size_pair("[long, short]"), "for the dataset's default"))
    ratio_range: list = _f(rule=RATIO_RANGE, factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = _f(0.75, number(gt=0, le=1))
    photometric: bool = _f(True, BOOL)
    # optimisation (SegFormer's recipe: AdamW 6e-5, wd 0.01, head lr x10, norms without decay, poly + warm-up)
    iters: int = _f(160_000, whole(1))
    batch_size: int = _f(16, whole(1))                 # per optimizer step and process, before accumulation
    # the paper's total batch: sets batch_size to global_batch / (processes x accum_steps)
    global_batch: Optional[int] = _f(None, optional(whole(1), "to use batch_size"))
    accum_steps: int = _f(1, whole(1))                 # micro-batches of batch_size per optimizer step
    optimizer: str = _f("adamw", one_of("adamw", "sgd"))
    nesterov: bool = _f(False, BOOL)                   # SGD only (Segmenter trains with Nesterov momentum 0.9)
    lr: float = _f(6e-5, number(gt=0))
    weight_decay: float = _f(0.01, number(ge=0))
    custom_keys: dict = _f(rule=CUSTOM_KEYS, factory=lambda: {"head": {"lr_mult": 10.0}, "norm": {"decay_mult": 0.0},
                                                              "pos_block": {"decay_mult": 0.0}})
    sync_bn: bool = _f(False, BOOL)                    # BatchNorm statistics over all processes (DDP on CUDA)
    # max L2 norm of all gradients (Mask2Former: 0.01)
    clip_grad_norm: Optional[float] = _f(None, optional(number(gt=0), "for no clipping"))
    compile: bool = _f(False, BOOL)                    # torch.compile the model (the first steps compile;
                                                       # gains in benchmarks/train_step.py, BENCHMARKS.md)
    power: float = _f(1.0, number(ge=0))
    min_lr_ratio: float = _f(0.0, number(ge=0, le=1))
    warmup_iters: int = _f(1500, whole(0))
    warmup_ratio: float = _f(1e-6, number(ge=0, le=1))
    # EoMT's [W1, W2] schedule instead of the warm-up above: the parameters the pre-trained encoder brings wait at
    # lr 0 for W1 iterations while the rest (head, queries) warm linearly from 0, then warm over W2; each decays
    # poly(power) over the iterations left after its own warm-up (engine/optim.two_stage_factor)
    two_stage_warmup: Optional[list] = _f(None, optional(TWO_STAGE, "for the warm-up above"))
    # OHEM pixel sampling, e.g. {thresh: null, min_kept: 100000}
    ohem: Optional[dict] = _f(None, optional(OHEM, "for no OHEM"))
    # "all": mmseg 0.x mean over all pixels; "valid": over labelled ones
    loss_reduction: str = _f("all", one_of("all", "valid"))
    # a weighted sum of pixel losses instead of cross-entropy, e.g. [{type: ce, class_weight: auto},
    # {type: dice, weight: 0.5}]: ce, dice, focal, lovasz (transeg.losses.pixel); class_weight auto is
    # computed from the training set's pixel counts when the run starts and written here as numbers
    loss: Optional[list] = _f(None, optional(LOSS, "for cross-entropy, or a mask head's own criterion"))
    amp: str = _f("no", one_of("no", "auto", "bf16", "fp16"))  # auto: bf16 where the hardware has it
    # test protocol used for periodic evaluation and stored in the checkpoint
    test_mode: str = _f("whole", one_of("whole", "slide"))
    test_scale: Optional[list] = _f(None, optional(size_pair("[long, short]"), "for the dataset's default"))
    test_crop: Optional[list] = _f(None, optional(size_pair("[h, w]"), "for whole-image tests"))
    test_stride: Optional[list] = _f(None, optional(size_pair("[h, w]"), "for whole-image tests"))
    size_divisor: Optional[int] = _f(32, optional(whole(1), "for no padding"))
    # test images whose short side is below it are enlarged to it (Segmenter's windows; SegViT's mmseg min_size)
    min_short_side: Optional[int] = _f(None, optional(whole(1), "to keep small images as they are"))
    # the paper's multi-scale + flip test (`transeg eval --ms`); ratios of the single-scale size
    ms_scales: list = _f(rule=SCALES, factory=lambda: [0.5, 0.75, 1.0, 1.25, 1.5, 1.75])
    ms_flip: bool = _f(True, BOOL)
    # best.safetensors keeps the checkpoint with the highest value of this metric on the validation set
    best_metric: str = _f("mIoU", one_of("mIoU", "mAcc", "aAcc", "mDice", "mFscore", "fwIoU"))
    # stop when best_metric has not improved for this many evaluations (null: train all iters, as the recipes)
    early_stop: Optional[int] = _f(None, optional(whole(1), "to train all iters"))
    # bookkeeping
    out: str = _f("runs/train", _text("an output folder"))
    eval_interval: int = _f(16_000, whole(1))
    ckpt_interval: int = _f(16_000, whole(1))
    log_interval: int = _f(50, whole(1))
    tensorboard: bool = _f(False, BOOL)                # also log to out/tb: the same as report_to: [tensorboard]
    # trackers to report to (engine/trackers.py; each needs its extra): losses, lr and speed at every log_interval,
    # every metric, per-class IoU and the prediction grid at each evaluation; --resume continues their runs
    report_to: list = _f(rule=REPORT_TO, factory=list)
    # push the run to this Hugging Face Hub repo (OWNER/NAME) when it ends (transeg.share: model, recipe, card)
    push_to: Optional[str] = _f(None, optional(Rule("a Hugging Face repo id OWNER/NAME", _repo_id), "for no push"))
    # with push_to: also push every N evaluations while training (the model as it is then)
    push_every: Optional[int] = _f(None, optional(whole(1), "to push only at the end"))
    workers: Union[int, str] = _f("auto", WORKERS)   # data-loading processes; auto: engine/samples.auto_workers
    seed: int = _f(0, whole(0, 2**64 - 1, "2**64-1"))
    device: str = _f("auto", DEVICE)

    def __post_init__(self):
        validate(self)

    def to_dict(self):
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# Rules between keys: (keys, test(cfg values) -> True if fine, what to do otherwise)
CROSS_RULES = [
    (("test_mode", "test_crop", "test_stride"),
     lambda c: c["test_mode"] != "slide" or (c["test_crop"] is not None and c["test_stride"] is not None),
     "test_mode=slide needs test_crop and test_stride, e.g. test_crop=[512,512] test_stride=[341,341]"),
    (("nesterov", "optimizer"), lambda c: not c["nesterov"] or c["optimizer"] == "sgd",
     "nesterov=true applies to optimizer=sgd only"),
    (("ohem", "loss"), lambda c: c["ohem"] is None or c["loss"] is None,
     "ohem samples pixels for the default cross-entropy; drop ohem (or the loss list)"),
    (("push_every", "push_to"), lambda c: c["push_every"] is None or c["push_to"] is not None,
     "push_every pushes the run to push_to: set push_to=OWNER/NAME too (a Hugging Face repo id)"),
]


def _plain(value):
    """numpy scalars -> int / float, tuples -> lists, paths -> str: what YAML writes and the rules read."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def show(value):
    """A value as the user would have written it in YAML, cut short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, dict)) and len(repr(value)) < 1000:
        try:
            text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        except yaml.YAMLError:
            text = repr(value)
    else:
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _problem(key, value):
    rule = FIELDS[key].metadata.get("rule")
    return rule.problem(value) if rule is not None else None


def _check(values, where=None, shown=None):
    """Raise TransegError for the first value of `values` (a full set of keys) that breaks its rule,
    then for the first rule between keys broken. `where`: key -> "FILE: " or "--set " (who gave it);
    `shown`: key -> the text the user typed."""
    where, shown = where or {}, shown or {}
    for key, value in values.items():
        problem = _problem(key, value)
        if problem:
            raise TransegError(f"{where.get(key, '')}{key}={shown.get(key) or show(value)}: {problem}")
    for keys, test, message in CROSS_RULES:
        if not test(values):
            origin = next((where[k] for k in keys if k in where), "")
            raise TransegError(f"{origin}{message}")


def validate(cfg: TrainConfig, machine=False) -> TrainConfig:
    """Check every key of `cfg` by its rule (and the rules between keys); raise TransegError with one
    line naming the key, its value and what is allowed. `machine=True` also checks what only this
    machine can answer: the weight files exist and are checkpoints, the device is present, `out` is
    not a file. Values are normalised in place (numpy numbers, tuples, paths). Returns cfg."""
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, _plain(getattr(cfg, f.name)))
    _check({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
    if machine:
        _check_machine(cfg)
    return cfg


def _looks_like_checkpoint(path):
    """A PyTorch file (zip or legacy pickle), .npz (zip) or .safetensors (8-byte header length, then JSON)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return True
    if len(head) == 9 and head[8:9] == b"{":
        return 0 < int.from_bytes(head[:8], "little") < os.path.getsize(path)
    return False


def _check_machine(cfg):
    import torch

    from ..zoo import RELEASES, is_name

    # (key, the file it reads, what else it may name)
    for key, what, names in (("pretrained", "a transeg .safetensors file", "a zoo name or a Hugging Face repo id"),
                             ("backbone_weights", "a .pth / .pt / .bin / .safetensors / .npz file or a Hugging Face "
                                                  "folder", "an ImageNet release of the zoo, e.g. mit-b2-imagenet")):
        value = getattr(cfg, key)
        if value is None:
            continue
        if is_name(value):  # a zoo name or Hub repo id: fetched (or named as unknown) when the run starts
            if key == "backbone_weights" and str(value) not in RELEASES:
                raise TransegError(f"{key}={value}: no such file (give {what}, {names}, or {key}=null)")
            continue
        path = Path(value)
        if not path.exists():
            raise TransegError(f"{key}={value}: no such file (give {what}, {names}, or {key}=null)")
        if path.is_dir() and key == "backbone_weights":
            continue  # a Hugging Face folder: its reader names what it lacks
        try:
            fine = path.is_file() and _looks_like_checkpoint(path)
        except OSError as e:
            raise TransegError(f"{key}={value}: cannot be read ({e.strerror})") from None
        if not fine:
            raise TransegError(f"{key}={value}: not a checkpoint (expected {what})")
    device = cfg.device if cfg.device != "auto" else None
    if device is not None and torch.device(device).type == "cuda":
        index, count = torch.device(device).index, torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (index is not None and index >= count):
            raise TransegError(f"device={device}: not available here ({count} CUDA device(s)); use device=cpu or auto")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise TransegError(f"out={cfg.out}: is a file, not a folder")


# `transeg train` with no config and no data: settings that train the built-in synthetic set well in
# minutes on a laptop CPU (from scratch, so a higher lr and a short warm-up than the papers' ImageNet
# fine-tuning)
QUICKSTART = dict(model="segformer-b0", iters=2500, batch_size=8, lr=1e-3, warmup_iters=100, ratio_range=[0.75, 1.5],
                  amp="auto", eval_interval=500, ckpt_interval=500, log_interval=25, out="runs/train")


def resolve(cfg: TrainConfig, dataset=None) -> TrainConfig:
    """Fill sizes left at None from the data: the synthetic set trains at its own image size
    (no rescale at ratio 1); folders get the papers' ADE20K sizes (crop 512, resize to (2048, 512)).
    Checks the config once more first (it may have been changed since it was made), with the machine."""
    validate(cfg, machine=True)
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


# ------------------------------------------------------------------------------------------------ YAML
# what other toolboxes call our keys, for the "did you mean" of an unknown key
_ALIASES = {"learning_rate": "lr", "base_lr": "lr", "max_iters": "iters", "num_iters": "iters", "iterations": "iters",
            "samples_per_gpu": "batch_size", "batch": "batch_size", "ims_per_batch": "global_batch", "crop": "crop_size",
            "img_scale": "scale", "dataset": "data", "data_root": "data", "fp16": "amp", "grad_clip": "clip_grad_norm",
            "warmup": "warmup_iters", "checkpoint": "pretrained", "output_dir": "out", "work_dir": "out"}

MAX_CONFIG_BYTES = 1 << 20    # recipes are ~2 kB
MAX_DEPTH = 32                # recipes nest 3 deep (custom_keys: {head: {lr_mult: 10}})
MAX_VALUES = 10_000           # scalars, lists and mappings after aliases are expanded; recipes have ~150


class _Refused(yaml.YAMLError):
    def __init__(self, problem, mark):
        super().__init__(problem)
        self.problem, self.mark = problem, mark


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses what no config needs and what would take unbounded time or memory
    later (every reader of the dict walks aliases as copies): nesting deeper than MAX_DEPTH (the
    composer recurses once per level), more than MAX_VALUES values once aliases are expanded (a
    "billion laughs" document), an alias inside the node it names (a cycle), a key given twice."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0
        self._cost = {}  # id(node) -> (values, depth) with aliases expanded

    def fetch_flow_collection_start(self, token_class):
        # the scanner's work per token grows with the flow nesting ([[[[...), so the bound comes first
        if self.flow_level >= MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels; a config is a mapping of keys to values",
                           self.get_mark())
        super().fetch_flow_collection_start(token_class)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self._cost:
                raise _Refused(f"alias *{event.anchor} is inside the value it names (a cycle); write the value out",
                               event.start_mark)
            return super().compose_node(parent, index)
        if self._depth >= MAX_DEPTH:
            raise _Refused(f"nested deeper than {MAX_DEPTH} levels; a config is a mapping of keys to values",
                           event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
            seen = {}
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if (key.tag, key.value) in seen:
                        raise _Refused(f"key {key.value!r} is given twice (first on line {seen[key.tag, key.value]}); "
                                       f"keep one", key.start_mark)
                    seen[key.tag, key.value] = key.start_mark.line + 1
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        costs = [self._cost[id(c)] for c in children]
        values, depth = 1 + sum(c[0] for c in costs), 1 + max((c[1] for c in costs), default=0)
        if values > MAX_VALUES:
            raise _Refused(f"aliases expand this value to more than {MAX_VALUES:,} values (a 'billion laughs' "
                           f"document?); refused: write the values out", node.start_mark)
        if depth > MAX_DEPTH:
            raise _Refused(f"aliases nest this value deeper than {MAX_DEPTH} levels; refused: write the values out",
                           node.start_mark)
        self._cost[id(node)] = (values, depth)
        return node


def parse_yaml(text):
    """YAML text -> Python values with _BoundedLoader (aliases are allowed within the bounds above).
    Raises yaml.YAMLError (_Refused for the bounds)."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_error(source, e):
    if isinstance(e, _Refused):
        return TransegError(f"{source}: line {e.mark.line + 1}: {e.problem}")
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if problem and mark is not None:
        return TransegError(f"{source}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}")
    return TransegError(f"{source}: invalid YAML ({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def _read_yaml(path):
    path = Path(path)
    if not path.exists():
        raise TransegError(f"{path}: no such config file")
    if not path.is_file():
        raise TransegError(f"{path}: not a file (a config is a YAML file of TrainConfig keys)")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise TransegError(f"{path}: {size / 2**20:.1f} MB is too large for a config (at most "
                           f"{MAX_CONFIG_BYTES >> 20} MB; recipes are a few kB)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise TransegError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                           f"save it as UTF-8") from None
    try:
        values = parse_yaml(text)
    except yaml.YAMLError as e:
        raise _yaml_error(path, e) from None
    except (ValueError, OverflowError) as e:  # e.g. an integer of more than 4300 digits
        raise TransegError(f"{path}: invalid YAML ({str(e).split(':')[0][:120]})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise TransegError(f"{path}: expected a mapping of keys to values, got a {type(values).__name__}")
    return values


def _check_keys(keys, source):
    for key in keys:
        if key not in FIELDS:
            name = str(key)
            near = [_ALIASES[name.lower()]] if name.lower() in _ALIASES else difflib.get_close_matches(name, FIELDS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise TransegError(f"{source}: unknown key {key!r}{hint}")


def _coerce(key, value, raw=None):
    """Give `value` the type of TrainConfig.<key> where the user clearly meant it: YAML 1.1 reads 1e-3 as
    a string (floats need a dot) and users write iters: 1000.0, amp: no (a bare no is false). What
    does not convert is returned as it is, and its rule then says what is allowed."""
    kind = FIELDS[key].type
    base = kind.__args__[0] if getattr(kind, "__args__", None) and type(None) in kind.__args__ else kind
    if kind == Union[int, str]:  # a count or a word (workers: auto): a number the user wrote is the count
        base = int
    if value is None:
        return value
    if base is str:
        if value is False and "no" in FIELDS[key].metadata["rule"].choices:
            return "no"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return raw if raw is not None else str(value)
        return value
    try:
        if base is bool and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        if base is int and not isinstance(value, bool) and isinstance(value, (str, float)):
            number = float(value)
            return int(number) if math.isfinite(number) and number == int(number) else value
        if base is float and not isinstance(value, bool) and isinstance(value, (str, int)):
            return float(value)
    except (TypeError, ValueError, OverflowError):
        pass
    return value


def load_config(path=None, overrides=(), **fields) -> TrainConfig:
    """TrainConfig from an optional YAML file, then keyword fields, then `key=value` overrides. Every
    value is checked by its key's rule before anything else happens; a bad one is named with where it
    came from (the file, or --set). A key set twice in `overrides` takes the last value, with a note."""
    values, where, shown = {}, {}, {}
    if path is not None:
        loaded = _read_yaml(path)
        _check_keys(loaded, path)
        for key, value in loaded.items():
            values[key], where[key] = _coerce(key, value), f"{path}: "
    for key, value in fields.items():
        if value is not None:
            _check_keys([key], "config")
            values[key] = _coerce(key, value)
            where.pop(key, None)
    given = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise TransegError(f"--set {item}: expected key=value")
        _check_keys([key], "--set")
        try:
            value = parse_yaml(raw)
        except _Refused as e:
            raise _yaml_error(f"--set {key}", e) from None
        except (yaml.YAMLError, ValueError, OverflowError):
            value = raw
        value = _coerce(key, value, raw)
        if key in given and given[key][1] != value and os.environ.get("RANK", "0") == "0":
            # the last wins, as with any repeated option (a script's base command + an override), but not silently
            print(f"transeg: note: --set {key} is given twice; the last, {key}={raw}, applies (not "
                  f"{key}={given[key][0]})", file=sys.stderr)
        given[key] = (raw, value)
        values[key], where[key], shown[key] = value, "--set ", raw
    defaults = TrainConfig.__new__(TrainConfig)  # the defaults, without running the check on them
    for f in dataclasses.fields(TrainConfig):
        setattr(defaults, f.name, f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
    _check({**vars(defaults), **{k: _plain(v) for k, v in values.items()}}, where, shown)
    return TrainConfig(**values)
