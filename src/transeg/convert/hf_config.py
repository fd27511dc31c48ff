"""Reading a Hugging Face `config.json` (beside converted weights) safely, and its class names.

Every converter that reads a config.json reads it through `read_config`, so a damaged or hostile one is
one line naming the file, before any weight is read:

- at most `MAX_CONFIG_BYTES` (4 MiB; real configs are a few KB, an ImageNet-21k id2label about 1 MB),
  checked from the file's size before it is read;
- UTF-8 JSON whose top level is an object;
- nested at most `MAX_CONFIG_DEPTH` (32) levels, counted before parsing (a 100,000-deep array would
  otherwise exhaust the parser's recursion).

Its `id2label`, when there is one, is checked there too: keys are the whole numbers 0..K-1 written plainly
("0", not "00"), each once, values non-empty strings. `class_names` turns it into the class list, K the
number of classes the weights' head has.
"""
import json
import re
from pathlib import Path

from ..errors import TransegError

MAX_CONFIG_BYTES = 4 * 2**20
MAX_CONFIG_DEPTH = 32

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


def _depth(text):
    """The deepest nesting of arrays / objects in JSON `text` (brackets inside strings not counted)."""
    deepest = level = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        level += 1 if m.group() in "[{" else -1
        deepest = max(deepest, level)
    return deepest


def read_config(path, name=None):
    """The JSON object in `path` (a config.json), checked as the module docstring says; TransegError naming
    `name` (default: the path) otherwise."""
    path = Path(path)
    name = name or path
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise TransegError(f"{name}: {size:,} bytes, more than a config.json holds (at most "
                               f"{MAX_CONFIG_BYTES:,}); is it the right file?")
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise TransegError(f"{name}: not a UTF-8 text file (expected a JSON config)") from None
    except OSError as e:
        raise TransegError(f"{name}: cannot be read ({e.strerror or e})") from None
    depth = _depth(text)
    if depth > MAX_CONFIG_DEPTH:
        raise TransegError(f"{name}: JSON nested {depth} levels deep; a config.json nests at most {MAX_CONFIG_DEPTH}")
    try:
        config = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise TransegError(f"{name}: not valid JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(config, dict):
        raise TransegError(f"{name}: expected a JSON object (the model's settings), got a {type(config).__name__}")
    _check_id2label(config, name)
    return config


def _check_id2label(config, name):
    """`config`'s id2label checked as class names 0..K-1 (K its entries): TransegError naming `name` otherwise."""
    id2label = config.get("id2label")
    if id2label is None or id2label == {}:
        return
    if not isinstance(id2label, dict):
        raise TransegError(f"{name}: id2label must map class ids to names, got a {type(id2label).__name__}")
    ids = set()
    for key, value in id2label.items():
        try:
            i = int(key)
        except ValueError:
            i = None
        if i is None or str(i) != key or i < 0:
            raise TransegError(f"{name}: id2label key {key[:40]!r} is not a class id (a whole number 0, 1, 2, ...)")
        if not isinstance(value, str) or not value.strip():
            raise TransegError(f"{name}: id2label[{key!r}] must be a class name, got {json.dumps(value)[:60]}")
        ids.add(i)
    missing = next(i for i in range(len(ids) + 1) if i not in ids)
    if missing < len(ids):
        raise TransegError(f"{name}: id2label's {len(ids)} ids must be 0..{len(ids) - 1}; {missing} is missing "
                           f"(ids given: {min(ids)}..{max(ids)})")


def class_names(config, num_classes, name):
    """The class names in `config`'s `id2label` (checked by `read_config`; None when it has none), which must
    name as many classes as the weights' head has (`num_classes`); TransegError naming `name` otherwise."""
    id2label = config.get("id2label") or {}
    if not id2label:
        return None
    if len(id2label) != num_classes:
        raise TransegError(f"{name}: id2label names {len(id2label)} classes but the weights' head has {num_classes}")
    return [id2label[str(i)] for i in range(num_classes)]
