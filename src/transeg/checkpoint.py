"""transeg checkpoints (one .safetensors file, metadata inside) and safe reading of foreign files.

A checkpoint's safetensors metadata holds one JSON entry, "transeg", with the variant name, the
constructor arguments, class names, palette, normalisation and the transeg version: everything
`load()` needs to rebuild a ready model. Foreign `.pth` files are read with `weights_only=True`
plus an explicit allow-list, so no pickled code ever runs.
"""
import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import TransegError

FORMAT = "transeg"


def atomic_write(path, write):
    """Call write(tmp_path), fsync, then rename over `path`: readers see the old file or the new
    one, never half of one (a crash or a full disk leaves the previous checkpoint intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        kept = "the previous version is intact" if path.exists() else "nothing was written"
        raise TransegError(f"{path}: could not be saved ({e.strerror or e}); {kept}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass


def model_metadata(model):
    from . import __version__

    meta = dict(model.meta)
    meta["version"] = __version__
    return meta


def save(model, path):
    """Write `model` (a Segmentor from `create_model`/`load`) to one .safetensors file."""
    if "variant" not in model.meta:
        raise TransegError("this model has no variant metadata; build it with transeg.create_model")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, FORMAT: json.dumps(model_metadata(model))}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return Path(path)


def read_metadata(path):
    path = Path(path)
    if not path.is_file():
        raise TransegError(f"{path}: no such checkpoint file")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise TransegError(f"{path}: not a safetensors file ({e}); foreign checkpoints go through `transeg convert`") from None
    if FORMAT not in meta:
        raise TransegError(f"{path}: a safetensors file without transeg metadata; "
                           "convert it first, e.g. `transeg convert DIR out.safetensors --from segformer-hf`")
    return json.loads(meta[FORMAT])


def load(path, map_location="cpu"):
    """Rebuild the model stored in `path`, load its weights, return it in eval mode."""
    from .registry import create_model

    meta = read_metadata(path)
    args = dict(meta["model_args"])
    num_classes = args.pop("num_classes")
    model = create_model(meta["variant"], num_classes=num_classes, classes=meta.get("classes"),
                         palette=meta.get("palette"), **args)
    model.meta.update(meta)  # keeps what else the file recorded (normalisation of converted models, dataset, ...)
    load_state_dict_checked(model, load_file(str(path), device=str(map_location)), source=path)
    return model.eval()


def load_state_dict_checked(model, state, source="checkpoint", target=None):
    """Strict load whose error lists missing, unexpected and misshapen keys in one line each.
    `target` names what is loaded into in that error (default: the model's variant and classes)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshapen = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or misshapen:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
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


def load_foreign(path):
    """Read a foreign .pth/.pt/.bin (weights_only, numpy meta allowed) or .safetensors file."""
    path = Path(path)
    if not path.exists():
        raise TransegError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise TransegError(f"{path}: unreadable safetensors file ({e})") from None
    if path.stat().st_size == 0:
        raise TransegError(f"{path}: empty file")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise TransegError(f"{path}: refused: loading it would run code{what}; only tensors and plain data are read "
                           "from foreign checkpoints (weights_only=True)") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise TransegError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0][:200]})") from None
