"""transeg checkpoints (one .safetensors file, metadata inside) and safe reading of foreign files.

A checkpoint's safetensors metadata holds one JSON entry, "transeg", with the variant name, the
constructor arguments, class names, palette, normalisation and the transeg version: everything
`load()` needs to rebuild a ready model. Foreign `.pth` files are read with `weights_only=True`
plus an explicit allow-list, so no pickled code ever runs.

A file is checked before it is trusted: its metadata is validated (types, and constructor
arguments that build exactly the tensors the file holds; the build is stopped before it allocates
more than the file could hold, so a file asking for a model of terabytes allocates nothing), and its
weights must be finite (a NaN weight would otherwise evaluate, predict and export as if nothing were
wrong).

A foreign .pth is a zip archive whose central directory declares each entry's unpacked size; before
`torch.load` unpacks anything, those sizes together may be at most `UNPACKED_RATIO` (2) times the file's size
plus `UNPACKED_SLACK` (64 MiB). `torch.save` stores its entries uncompressed (unpacked = packed), so every
real checkpoint fits; a small file that would unpack to gigabytes (a zip bomb) is refused from its header.
"""
import inspect
import json
import math
import pickle
import re
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import TransegError
from .files import atomic_write
from .protocol import Protocol
from .registry import create_model, get_variant
from .version import __version__

FORMAT = "transeg"


def first_nonfinite(state, order=None):
    """(name, count of NaN/inf values) of the first floating-point tensor in `state` (in `order`, else
    the dict's) that is not all finite, else None. One min/max reduction per tensor (NaN propagates
    through both, inf shows in one): it reads the weights once and allocates nothing, where
    isfinite().all() writes a boolean copy of every tensor (BENCHMARKS.md: Checking weights are finite),
    and on a GPU the extremes are read back once for all tensors (one host sync, not one per tensor)."""
    names = [n for n in (order or state) if n in state and state[n].is_floating_point()
             and not state[n].is_meta and state[n].numel()]
    if not names:
        return None
    extremes = [torch.stack(torch.aminmax(state[n])).float() for n in names]
    finite = torch.isfinite(torch.stack([e.to(extremes[0].device) for e in extremes])).all(1).cpu()
    if bool(finite.all()):
        return None
    name = names[int((~finite).nonzero()[0, 0])]
    return name, int((~torch.isfinite(state[name])).sum())


def model_metadata(model):
    meta = dict(model.meta)
    meta["version"] = __version__
    return meta


def save(model, path):
    """Write `model` (a Segmentor from `create_model`/`load`) to one .safetensors file. A model with
    NaN/inf weights is refused: `load` would refuse the file."""
    if "variant" not in model.meta:
        raise TransegError("this model has no variant metadata; build it with transeg.create_model")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    bad = first_nonfinite(state)
    if bad:
        raise TransegError(f"{path}: not saved: tensor {bad[0]} holds {bad[1]} NaN/inf value(s); the model's "
                           f"weights are broken (a diverged training run?)")
    metadata = {"format": FORMAT, FORMAT: json.dumps(model_metadata(model))}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return Path(path)


def _header(path):
    """(metadata dict, {tensor name: shape}) from the file's header, without reading any weights."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise TransegError(f"{path}: not a safetensors file ({e}); foreign checkpoints go through `transeg convert`") from None
    return meta, shapes


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _describe(value, limit=60):
    text = json.dumps(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_metadata(meta, path):
    """`meta` (the decoded "transeg" entry) with its types checked; TransegError naming `path` and the
    field otherwise. What must fit the model (constructor arguments vs tensors) is checked by `load`."""
    def bad(what):
        return TransegError(f"{path}: bad transeg metadata: {what}; re-save the model or convert the original again")

    if not isinstance(meta, dict):
        raise bad(f"expected a JSON object, got {type(meta).__name__} {_describe(meta)}")
    variant = meta.get("variant")
    if not isinstance(variant, str) or not variant:
        raise bad("no 'variant' (the model name, e.g. \"segformer-b0\")" if variant is None
                  else f"'variant' must be a model name, got {_describe(variant)}")
    args = meta.get("model_args")
    if not isinstance(args, dict):
        raise bad(f"'model_args' must be an object of constructor arguments, got {_describe(args)}")
    k = args.get("num_classes")
    if not _is_int(k) or k < 1:
        raise bad(f"model_args.num_classes must be a whole number of classes, got {_describe(k)}")
    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) != k
                                or not all(isinstance(c, str) and c.strip() for c in classes)):
        raise bad(f"'classes' must be a list of {k} class names, got {_describe(classes)}")
    palette = meta.get("palette")
    if palette is not None:
        if not isinstance(palette, list) or len(palette) < k:
            raise bad(f"'palette' must be a list of {k} [r, g, b] colours, got {_describe(palette)}")
        for i, c in enumerate(palette):
            # the structure only: values outside 0..255 come from converted files whose source had them
            # (the converter keeps a .pth's PALETTE as is); the weights are fine and drawing says so
            if not (isinstance(c, list) and len(c) == 3 and all(_is_int(v) for v in c)):
                raise bad(f"'palette' entry {i} must be [r, g, b] (3 whole numbers), got {_describe(c)}")
    for key in ("mean", "std"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)
                                      and (key == "mean" or min(value) > 0)):
            raise bad(f"'{key}' must be 3 {'positive ' if key == 'std' else ''}numbers (one per RGB channel), "
                      f"got {_describe(value)}")
    test = meta.get("test")
    if test is not None:
        if not isinstance(test, dict):
            raise bad(f"'test' (the test protocol) must be an object, got {_describe(test)}")
        try:
            Protocol.from_meta(test)
        except TransegError as e:
            raise bad(str(e)) from None
        except (TypeError, ValueError) as e:
            raise bad(f"'test' protocol {_describe(test)} ({e})") from None
    return meta


def read_metadata(path):
    """The checkpoint's transeg metadata (a dict, types checked), read from its header only."""
    path = Path(path)
    if not path.is_file():
        raise TransegError(f"{path}: no such checkpoint file")
    return _read_metadata(path)[0]


def _read_metadata(path):
    raw, shapes = _header(path)
    if FORMAT not in raw:
        raise TransegError(f"{path}: a safetensors file without transeg metadata; "
                           "convert it first, e.g. `transeg convert DIR out.safetensors --from segformer-hf`")
    try:
        meta = json.loads(raw[FORMAT])
    except ValueError as e:
        raise TransegError(f"{path}: bad transeg metadata: not JSON ({e}); re-save the model or convert the "
                           f"original again") from None
    return check_metadata(meta, path), shapes


class _AllocationBudget(torch.overrides.TorchFunctionMode):
    """Counts the elements the tensor factories are asked for while a model is built and stops the
    build (BudgetExceeded) before the call that would pass `limit`. A checkpoint whose metadata asks for
    embed_dims of 10^8 is refused before anything is allocated, without a dry run on the meta device:
    there PyTorch runs normal_, erfinv_, stack ... through its Python reference ops, whose first use
    imports torch._dynamo, a start-up cost every `transeg eval/predict` would pay (BENCHMARKS.md:
    Checking a checkpoint's size before building it)."""

    _SIZED = {torch.empty, torch.zeros, torch.ones, torch.randn, torch.rand, torch.full}

    class BudgetExceeded(Exception):
        pass

    def __init__(self, limit):
        super().__init__()
        self.limit, self.used = limit, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        n = None
        if func in self._SIZED:
            size = kwargs.get("size", args[0] if len(args) == 1 or func is torch.full else args)
            if isinstance(size, (list, tuple, torch.Size)) or _is_int(size):
                dims = [size] if _is_int(size) else list(size)
                if all(_is_int(d) for d in dims):
                    n = math.prod(dims)
        elif func in (torch.arange, torch.linspace) and args and all(isinstance(a, (int, float)) for a in args[:3]):
            if func is torch.linspace:
                n = int(args[2]) if len(args) > 2 else int(kwargs.get("steps", 0))
            else:
                start, end, step = (0, args[0], 1) if len(args) == 1 else (args[0], args[1], args[2] if len(args) > 2 else 1)
                n = max(0, math.ceil((end - start) / step)) if step else 0
        if n is not None:
            self.used += n
            if self.used > self.limit:
                raise self.BudgetExceeded(self.used)
        return func(*args, **kwargs)


# constructor arguments that count layers: each layer holds at least one tensor, so a file cannot ask
# for more layers than it has tensors (checked before building: the drop-path schedule alone is a
# Python list as long as the layer count)
_LAYER_COUNT = re.compile(r"depth|layers")


def _build_checked(path, meta, shapes):
    """Build the model `meta` describes, refusing (one line naming `path`) metadata that does not fit
    its variant's constructor or that would build more than the file's tensors hold, before the
    allocation; then check it has exactly the file's tensors, before any weight is read."""
    args = dict(meta["model_args"])
    num_classes = args.pop("num_classes")
    try:
        variant = get_variant(meta["variant"])
    except TransegError as e:
        raise TransegError(f"{path}: {e}") from None
    known = set(inspect.signature(variant.build).parameters) - {"num_classes"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise TransegError(f"{path}: metadata model_args do not fit {variant.name}: unknown argument(s) {unknown}; "
                           f"known: {sorted(known)}")
    for key, value in args.items():
        if _LAYER_COUNT.search(key):
            counts = value if isinstance(value, list) else [value]
            total = sum(v for v in counts if _is_int(v))
            if total > len(shapes):
                raise TransegError(f"{path}: metadata model_args {key}={_describe(value)} asks for more layers than "
                                   f"the file's {len(shapes)} tensors can hold; the metadata is damaged")
    held = sum(math.prod(s) for s in shapes.values())
    # building allocates the weights once, plus a few temporaries and buffers the file does not keep
    budget = _AllocationBudget(2 * held + 2**24)
    try:
        with budget:
            model = create_model(variant.name, num_classes=num_classes, classes=meta.get("classes"),
                                 palette=meta.get("palette"), **args)
    except _AllocationBudget.BudgetExceeded as e:
        raise TransegError(f"{path}: its metadata describes a {variant.name} of at least {e.args[0]:,} weights but "
                           f"the file holds {held:,} (model_args {_describe(meta['model_args'], 120)}); the "
                           f"metadata is damaged") from None
    except TransegError as e:
        raise TransegError(f"{path}: metadata model_args do not fit {variant.name}: {e}") from None
    except Exception as e:  # a constructor given the wrong types / values: the file's fault
        raise TransegError(f"{path}: metadata model_args do not fit {variant.name} "
                           f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if own != shapes:
        missing = [k for k in own if k not in shapes]
        unexpected = [k for k in shapes if k not in own]
        misshapen = [f"{k} {shapes[k]} vs {own[k]}" for k in own if k in shapes and shapes[k] != own[k]]
        parts = [f"{len(keys)} {label}: {', '.join(keys[:3])}" + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
                 for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)) if keys]
        raise TransegError(f"{path}: its metadata describes a {variant.name} that does not fit the file's tensors "
                           f"({'; '.join(parts)}); the metadata is damaged")
    return model


def load(path, map_location="cpu"):
    """Rebuild the model stored in the transeg .safetensors file `path`, load its weights, return it in
    eval mode. The metadata is checked against the file's header before the weights are read, and NaN/inf
    weights are refused. (`transeg.load` also takes zoo names and Hub repo ids: `zoo.load`.)"""
    path = Path(path)
    if not path.is_file():
        raise TransegError(f"{path}: no such checkpoint file")
    meta, shapes = _read_metadata(path)
    model = _build_checked(path, meta, shapes)
    model.meta.update(meta)  # keeps what else the file recorded (normalisation of converted models, dataset, ...)
    try:
        state = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise TransegError(f"{path}: unreadable safetensors file ({e})") from None
    bad = first_nonfinite(state, order=model.state_dict())
    if bad:
        raise TransegError(f"{path}: tensor {bad[0]} holds {bad[1]} NaN/inf value(s); the checkpoint is damaged or was "
                           f"saved after training diverged; use an earlier checkpoint")
    load_state_dict_checked(model, state, source=path)
    return model.eval()


def load_state_dict_checked(model, state, source="checkpoint", target=None):
    """Strict load whose error lists missing, unexpected, misshapen and wrongly typed (whole numbers for
    floating-point weights) keys in one line each.
    `target` names what is loaded into in that error (default: the model's variant and classes)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshapen = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state and state[k].shape != own[k].shape]
    # whole-number (or bool) tensors for floating-point weights: copying would silently turn them into weights
    # of whole numbers (a quantised or damaged file), which run and predict as if nothing were wrong
    mistyped = [f"{k} ({str(state[k].dtype).removeprefix('torch.')}, not floating-point)"
                for k in own if k in state and own[k].is_floating_point()
                and isinstance(state[k], torch.Tensor) and not state[k].is_floating_point()]
    if missing or unexpected or misshapen or mistyped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen),
                            ("of the wrong type", mistyped)):
            if keys:
                more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:5])}{more}")
        target = target or f"{model.meta.get('variant', 'the model')} with {model.num_classes} classes"
        raise TransegError(f"{source}: does not fit {target}; " + "; ".join(parts))
    model.load_state_dict(state)


def _numpy_safe_globals():
    """numpy types that mmcv-era checkpoints keep in `meta` (numpy scalars and arrays in env/config
    entries). They are plain data; allowing exactly these names keeps weights_only loading strict for
    everything else. Files pickled under numpy 1.x name the modules `numpy.core.*`, numpy 2 `numpy._core.*`."""
    import numpy as np

    multiarray = getattr(np, "_core", None) or np.core
    reconstruct, scalar = multiarray.multiarray._reconstruct, multiarray.multiarray.scalar
    allowed = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(reconstruct, f"{module}._reconstruct"), (scalar, f"{module}.scalar")]
    for name in ("Float16DType", "Float32DType", "Float64DType", "Int8DType", "Int16DType", "Int32DType",
                 "Int64DType", "UInt8DType", "BoolDType", "StrDType", "ObjectDType"):
        if hasattr(np, "dtypes") and hasattr(np.dtypes, name):
            allowed.append((getattr(np.dtypes, name), f"numpy.dtypes.{name}"))
    return allowed


UNPACKED_RATIO = 2
UNPACKED_SLACK = 64 * 2**20


def _check_unpacked_size(path, size):
    """Refuse a zip-format .pth whose entries declare more unpacked bytes than the module docstring's bound."""
    if not zipfile.is_zipfile(path):
        return  # the legacy pickle format (torch < 1.6): its tensors are stored as they are
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # torch.load says what is wrong with it
    limit = UNPACKED_RATIO * size + UNPACKED_SLACK
    if declared > limit:
        raise TransegError(f"{path}: refused: its {size:,} bytes declare {declared:,} bytes unpacked, more than "
                           f"{UNPACKED_RATIO}x the file + {UNPACKED_SLACK // 2**20} MiB ({limit:,}); a checkpoint "
                           "saved by torch.save is not compressed, so this one is damaged or a zip bomb")


def load_foreign(path):
    """Read a foreign .pth/.pt/.bin (weights_only, numpy meta allowed) or .safetensors file. A zip-format .pth
    that declares more unpacked bytes than the bound in the module docstring is refused before it is read."""
    path = Path(path)
    if not path.exists():
        raise TransegError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise TransegError(f"{path}: unreadable safetensors file ({e})") from None
    size = path.stat().st_size
    if size == 0:
        raise TransegError(f"{path}: empty file")
    _check_unpacked_size(path, size)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:
            raise TransegError(f"{path}: refused: loading it would run code ({found.group(1)}); only tensors and plain "
                               "data are read from foreign checkpoints (weights_only=True)") from None
        raise TransegError(f"{path}: not a PyTorch checkpoint (its bytes do not unpickle; damaged, or another kind of "
                           "file)") from None
    except (RuntimeError, EOFError, OSError) as e:
        # torch's own text, to its first sentence ("PytorchStreamReader failed reading zip archive: not a ZIP archive")
        reason = str(e).strip().split(". ")[0].splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise TransegError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
    except Exception:  # noqa: BLE001 - garbage bytes fail the unpickler in any way (KeyError, IndexError, ...)
        raise TransegError(f"{path}: not a PyTorch checkpoint (its bytes do not unpickle; damaged, or another kind of "
                           "file)") from None
