"""The tables the families fill: variants, families and checkpoint formats. Names no family itself.

    model = create_model("segformer-b0", num_classes=19)

A family (a package under `transeg.families`, or a plug-in installed under the `transeg.families`
entry-point group) declares itself with `register_family`, each of its variants with `register` (the
builder, its constructor arguments and what the paper reports, `Paper`), and each checkpoint format it
reads with `register_format` (the Hugging Face `model_type`s it reads included). Paper facts sit beside
each variant so tests and `transeg models` show them next to measured numbers.
"""
import difflib
import inspect
import numbers
from dataclasses import dataclass, field
from typing import Callable

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .errors import TransegError


@dataclass(frozen=True)
class Paper:
    """What the authors report for a variant, and what running their code counted."""
    params_m: float | None = None                # the paper's / README's params, in millions
    official_params: int | None = None           # the authors' model's exact count (150 classes unless official_classes)
    official_params_by_classes: dict[int, int] = field(default_factory=dict)  # {class count: exact count}
    official_classes: int | None = None          # the class count official_params was counted with, when not 150
    gflops: dict[str, float | None] = field(default_factory=dict)  # {"HxW@K": GFLOPs}: input size, class count
    gflops_convention: str = "mmcv"              # the counter the paper used (flops.count_gmacs: mmcv | fvcore)
    miou: dict[str, float] = field(default_factory=dict)     # {dataset: single-scale mIoU}
    miou_ms: dict[str, float] = field(default_factory=dict)  # {dataset: multi-scale + flip mIoU}
    reference: str = ""


@dataclass(frozen=True)
class Variant:
    name: str
    family: str
    build: Callable
    kwargs: dict
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    paper: Paper = field(default_factory=Paper)

    def arguments(self) -> dict:
        """The constructor arguments this variant builds with: its builder's defaults, then `kwargs`."""
        defaults = {k: p.default for k, p in inspect.signature(self.build).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        return {**defaults, **self.kwargs}


@dataclass(frozen=True)
class Family:
    """A model family: its name (the prefix of its variants), the paper, and what only it has.

    counting: how `transeg models` counts its params and GFLOPs against the paper's, one phrase.
    hf_peer: (variant name, num_classes, seed) -> (transeg model, Hugging Face model) with the same
    weights, for `transeg bench --compare hf`; None where transformers has no such model.
    tiny: a variant's constructor arguments -> the overrides that shrink it to a model under a million
    parameters with the same code paths (what the tests build every registered variant at)."""
    name: str
    title: str
    paper: str
    counting: str = ""
    hf_peer: Callable | None = None
    tiny: Callable[[dict], dict] = lambda arguments: {}


@dataclass(frozen=True)
class Format:
    """A checkpoint format `transeg convert --from NAME` reads.

    convert(obj, source, model=None[, base]) -> dict(variant, num_classes, state, classes, palette
    [, overrides, test]); `obj` is the source file read without running code, or, with reads_path, the path
    itself (the converter opens it: a save_pretrained folder with its config.json, or a file); hub_model_types: the transformers `model_type`s of Hub repos it
    reads (their folder is given); base: what `--base` gives for formats whose files are deltas to other
    weights (empty: none)."""
    name: str
    description: str
    convert: Callable
    reads_path: bool = False
    hub_model_types: tuple = ()
    base: str = ""


VARIANTS: dict[str, Variant] = {}
FAMILIES: dict[str, Family] = {}
FORMATS: dict[str, Format] = {}


def _add(table, key, value, what):
    if key in table:
        raise ValueError(f"{what} {key} registered twice")
    table[key] = value
    return value


def register(variant: Variant):
    return _add(VARIANTS, variant.name, variant, "variant")


def register_family(family: Family):
    return _add(FAMILIES, family.name, family, "family")


def register_format(fmt: Format):
    return _add(FORMATS, fmt.name, fmt, "format")


def list_models(family=None):
    return [n for n, v in VARIANTS.items() if family is None or v.family == family]


def families():
    """The registered model families, in registration order."""
    return list(FAMILIES)


def get_family(name) -> Family:
    if name not in FAMILIES:
        raise TransegError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def get_format(name) -> Format:
    if name not in FORMATS:
        raise TransegError(f"unknown format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


def hub_format(model_type):
    """The format that reads Hub repos of this transformers `model_type`, or None."""
    return next((f for f in FORMATS.values() if model_type in f.hub_model_types), None)


def get_variant(name) -> Variant:
    if name not in VARIANTS:
        near = difflib.get_close_matches(name, list(VARIANTS), n=3)
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise TransegError(f"unknown model {name!r}{hint}; `transeg models` lists them")
    return VARIANTS[name]


def create_model(name, num_classes=150, classes=None, palette=None, **overrides):
    """Build a variant with fresh weights (a `Segmentor`). `overrides` replace constructor arguments
    (e.g. drop_path_rate)."""
    variant = get_variant(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise TransegError(f"{name}: num_classes must be a whole number >= 1, got {num_classes!r}")
    num_classes = int(num_classes)
    if classes is not None and len(classes) != num_classes:
        raise TransegError(f"{len(classes)} class names given for a {num_classes}-class model")
    known = set(inspect.signature(variant.build).parameters) - {"num_classes"}
    unknown = set(overrides) - known
    if unknown:
        raise TransegError(f"{name}: unknown argument(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {**variant.kwargs, **overrides}
    model = variant.build(num_classes=num_classes, **kwargs)
    model.meta.update(variant=name, model_args={"num_classes": num_classes, **overrides},
                      classes=list(classes) if classes is not None else None,
                      palette=[list(c) for c in palette] if palette is not None else None,
                      mean=list(variant.mean), std=list(variant.std))
    return model
