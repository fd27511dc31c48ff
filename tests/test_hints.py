"""What the CLI tells a user to type exists: every hint that names a flag names one the command it is printed by
takes (issue 33, item 3: `transeg pull acme/eomt-tiny` said "pass --model", which `pull` refuses), and every
option of every verb says what it does in --help.

The hints are collected from the sources: every string a function builds (f-strings with their placeholders,
concatenations), docstrings and argparse's declarations left out. A flag inside a backquoted command
(`transeg convert SRC OUT --from eomt --model NAME`) is checked against that command's parser; any other flag
against the parsers of every verb whose code path reaches the function (REACH below: a module's messages are
reached by the verbs listed for it, a function's where it is reached by fewer). Then the paths the issue
found, run: `pull` of a Hub repo of no registered variant, `data check` of a missing folder, and the
service's ISR parameters."""
import argparse
import ast
import re
from pathlib import Path

import pytest

from test_zoo import _publish, cache, server  # noqa: F401 (the zoo tests' loopback Hub and fresh caches)
from transeg.cli import build_parser, main

SRC = Path(__file__).resolve().parents[1] / "src" / "transeg"

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*(?![\w-])")
# commands of other programs, whose flags are theirs (torchrun --max-restarts, curl --data-binary, pip ...)
OTHER_PROGRAM = re.compile(r"\b(?:torchrun|curl|pip|python3?|apt-get)(?:\s+(?:--?[\w-]+|[^\s`-]\S*))*")

# The verbs that take a checkpoint: by file, zoo name or Hub repo id (train's --pretrained and backbone_weights
# too), so each reaches the zoo's download and conversion.
CHECKPOINT = {"pull", "train", "eval", "predict", "bench", "serve", "export"}
ONNX = {"eval", "predict", "serve"}  # --backend: an .onnx model where a checkpoint goes

# Module (path under src/transeg, a folder for all its modules) -> the verbs whose code path reaches its messages.
REACH = {
    "bench.py": {"bench"},
    "checkpoint.py": CHECKPOINT | {"convert", "push"},
    "convert/": CHECKPOINT | {"convert"},  # the zoo converts a release for every verb that takes a checkpoint
    "families/": CHECKPOINT | {"convert"},
    "data/": {"train", "eval", "bench", "data check"},
    "data/prepare.py": {"data prepare"},
    "deploy/backend.py": ONNX,
    "deploy/quantize.py": {"export"},
    "device.py": {"train", "eval", "predict", "bench", "serve"},
    "engine/": {"train"},
    "engine/evaluate.py": {"train", "eval", "bench"},
    "export.py": {"export"},
    "flops.py": {"models", "bench"},
    "hub.py": CHECKPOINT | {"push"},
    "images.py": {"predict", "serve"},
    "isr.py": {"eval", "predict", "bench", "export"},  # the service passes its own names (isr_encoder, ...)
    "protocol.py": {"eval", "predict"},  # train refuses test_mode=slide without test_crop in its config first
    "serve/": {"serve"},
    "share.py": {"push", "train"},  # train's push_to pushes at the end of a run
    "tiled.py": {"predict"},
    "zoo.py": CHECKPOINT,
}
# Functions of those modules reached by fewer verbs, with why.
FUNCTION_REACH = {
    # its flag message is about base=, which only `transeg convert --base` passes
    "convert/__init__.py:convert": {"convert"},
    "families/eomt/convert.py:convert": {"convert"},
    "families/eomt/convert.py:add_dinov3_base": {"convert"},  # (with no base, it names the convert command)
    "families/eomt/convert.py:_base_config": {"convert"},
    # backbone_weights (a recipe key, or --set) is training's alone
    "convert/__init__.py:load_backbone_weights": {"train"},
    "zoo.py:backbone_weights": {"train"},
    # ISR on an .onnx model comes from eval's / predict's --isr-encoder; the service refuses a setting for a model
    # without pooling groups (isr.check_setting) before it reaches the model
    "deploy/backend.py:set_isr": {"eval", "predict"},
    # train's push_to says a failed push in a line naming `transeg push OUT REPO`, the command that takes --force
    "share.py:_check_existing": {"push"},
    # --data is their option= default; `transeg data check DIR` passes option="" and `export --int8 --calibrate
    # DATA` option="--calibrate" (deploy/quantize.py:dataset_images), so those lines are checked run (below)
    "data/__init__.py:build_dataset": {"train", "eval", "bench"},
    "data/__init__.py:build_splits": {"train", "eval", "bench"},
    "data/__init__.py:_synthetic_options": {"train", "eval", "bench"},
    "data/__init__.py:_parse_size": {"train", "eval", "bench"},
    # --calibrate's dataset errors, re-worded there (leaving --calibrate out is dynamic int8, not the synthetic set)
    "deploy/quantize.py:dataset_images": {"export"},
}
# The CLI's helpers (cmd_<verb> and cmd_data_<action> map themselves)
CLI_HELPERS = {"_truth_files": {"predict"}, "_predict_tiled": {"predict"}, "_print_zoo": {"models"},
               "_export_int8": {"export"}, "_print_sweep_row": {"bench"}, "_load": ONNX | {"export"}}
CLI_DECLARATIONS = re.compile(r"^(_\w+_args|_\w+_parser|_add_\w+|build_parser|_verb|main)$")


def _parsers():
    """{"models": parser, ..., "data check": parser, "data prepare": parser}."""
    found = {}

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found[" ".join(path + [name])] = sub
                    walk(sub, path + [name])
    walk(build_parser(), [])
    return found


PARSERS = _parsers()


def _flags(verb):
    """The options `verb` takes (none for a verb that does not exist)."""
    return {o for a in PARSERS[verb]._actions for o in a.option_strings} if verb in PARSERS else set()


def _render(node):
    """The text of a string expression (each placeholder as {}), or None when `node` is not one."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _render(node.left), _render(node.right)
        return None if left is None or right is None else left + right
    return None


def _strings(function):
    """The string expressions `function` builds (largest first: parts of one are not listed again), its
    docstring and argparse declarations left out."""
    skip = set()
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        skip.add(id(body[0].value))
    nodes = [n for part in body + function.args.defaults + function.args.kw_defaults if part is not None
             for n in ast.walk(part)]
    for node in nodes:
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") in (
                "add_argument", "add_argument_group", "add_parser", "add_subparsers", "ArgumentParser"):
            skip |= {id(n) for n in ast.walk(node)}
    for node in nodes:
        text = _render(node) if id(node) not in skip else None
        if text is not None:
            skip |= {id(n) for n in ast.walk(node)}
            yield node.lineno, text


def _functions(tree):
    """(qualified name of the innermost function, function node) for every function of a module; a nested
    function's strings belong to it, not to its parent."""
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield child.name, child
                yield from walk(child, child.name)
            else:
                yield from walk(child, prefix)
    yield from walk(tree, "")


def _reach(module, function):
    """The verbs whose code path reaches `function` of `module` (a path under src/transeg)."""
    if module == "cli.py":
        m = re.match(r"^cmd_(data_)?(\w+)$", function)
        if m:
            return {f"data {m.group(2)}" if m.group(1) else m.group(2)}
        return CLI_HELPERS.get(function)
    if f"{module}:{function}" in FUNCTION_REACH:
        return FUNCTION_REACH[f"{module}:{function}"]
    best = max((k for k in REACH if module == k or (k.endswith("/") and module.startswith(k))), key=len, default=None)
    return REACH.get(best)


def _hints():
    """(where, text, verbs that reach it) of every string in a function that names a flag."""
    for path in sorted(SRC.rglob("*.py")):
        module = str(path.relative_to(SRC))
        for name, function in _functions(ast.parse(path.read_text())):
            if module == "cli.py" and CLI_DECLARATIONS.match(name):
                continue  # --help texts: they may describe another verb's options
            for lineno, text in _strings(function):
                if FLAG.search(text):
                    yield f"{module}:{lineno} ({name})", text, _reach(module, name)


def _check(text, verbs):
    """The flags of `text` that a command it speaks for does not take: in a backquoted `transeg VERB ...`
    command, VERB's; elsewhere, every verb of `verbs`, unless a backquoted command of the same text spells
    it out ("export it with --int8 (`transeg export MODEL out.onnx --int8`)")."""
    wrong, spelled = [], set()
    for command in re.findall(r"`([^`]*)`", text):
        words = command.split()
        if words[:1] == ["transeg"] and len(words) > 1 and not words[1].startswith("-"):
            verb = " ".join(words[1:3]) if " ".join(words[1:3]) in PARSERS else words[1]
            wrong += [f"{f} (`transeg {verb}`)" for f in FLAG.findall(command) if verb not in PARSERS
                      or f not in _flags(verb)]
            spelled |= set(FLAG.findall(command))
            text = text.replace(f"`{command}`", "")
    bare = [f for f in FLAG.findall(OTHER_PROGRAM.sub("", re.sub(r"`(?:torchrun|curl|pip|python3?)[^`]*`", "", text)))
            if f not in spelled]
    for verb in sorted(verbs or ()):
        wrong += [f"{f} ({verb})" for f in bare if f not in _flags(verb)]
    return wrong


def test_the_hints_are_found():
    """The collector sees the messages it is meant to check (a few known ones, in several modules)."""
    found = {where.split(":")[0] for where, _, _ in _hints()}
    assert {"cli.py", "zoo.py", "engine/run.py", "serve/limits.py", "data/__init__.py", "bench.py"} <= found
    assert sum(1 for _ in _hints()) > 60


def test_every_hint_names_a_flag_its_command_takes():
    unmapped, wrong = [], []
    for where, text, verbs in _hints():
        if verbs is None and FLAG.findall(re.sub(r"`[^`]*`", "", OTHER_PROGRAM.sub("", text))):
            unmapped.append(where)  # bare flags in a module no verb is listed for: add it to REACH
        for bad in _check(text, verbs):
            wrong.append(f"{where}: {bad}: {text[:160]!r}")
    assert not unmapped, f"map these to the verbs that reach them (REACH / FUNCTION_REACH / CLI_HELPERS): {unmapped}"
    assert not wrong, "\n".join(wrong)


def test_the_checker_catches_the_issues_hint():
    """The hint the issue found, checked as it was: `pass --model` reached by `pull` is wrong; the same
    words inside a backquoted `transeg convert` command are right."""
    assert _check("x: matches no registered variant; pass --model (an eomt-* name)", {"pull"}) == ["--model (pull)"]
    assert _check("x: convert it: `transeg convert X OUT.safetensors --from eomt --model NAME`", {"pull"}) == []
    assert _check("`transeg pull NAME --model X`", set()) == ["--model (`transeg pull`)"]
    assert _check("give --data X", {"data check"}) == ["--data (data check)"]
    assert _check("launch with torchrun --max-restarts 3", {"train"}) == []


def test_every_option_of_every_verb_has_help():
    """`transeg VERB --help` explains each option (bench's --batch, --num-classes, --warmup and --device had
    none), the data actions' too."""
    missing = [f"{verb} {a.option_strings or a.dest}" for verb, parser in PARSERS.items() for a in parser._actions
               if not isinstance(a, argparse._SubParsersAction) and (not a.help or a.help == argparse.SUPPRESS)]
    top = [a.option_strings for a in build_parser()._actions
           if not isinstance(a, argparse._SubParsersAction) and not a.help]
    assert not missing and not top, missing + top
    assert len(PARSERS) >= 11  # every verb, and data's two actions, were walked


# ----------------------------------------------------------------------------------------------- run
def _error(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("transeg: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def test_pull_of_a_hub_repo_of_no_registered_variant_names_the_command_that_takes_model(server, tmp_path, capsys):
    """`transeg pull acme/eomt-tiny` (an EoMT no variant builds, on the zoo tests' loopback Hub): the line names
    `transeg convert ... --model`, which exists, not `pull --model`, which argparse refuses."""
    transformers = pytest.importorskip("transformers")
    from test_eomt import TINY

    hf = transformers.EomtForUniversalSegmentation(transformers.EomtConfig(**TINY)).eval()
    hf.save_pretrained(tmp_path / "eomt-tiny")
    _publish(server, "acme/eomt-tiny", {p.name: p.read_bytes() for p in (tmp_path / "eomt-tiny").iterdir()})
    assert main(["pull", "acme/eomt-tiny"]) == 2
    line = _error(capsys)
    assert "acme/eomt-tiny: " in line and "matches no registered variant" in line and "`transeg convert " in line
    assert "--model NAME` (an eomt-* name)" in line and _check(line, {"pull"}) == [], line


def test_data_check_of_a_missing_folder_names_no_data_option(tmp_path, capsys):
    """`transeg data check DIR` takes DIR, not --data: its refusal says so in its own words (train's keeps
    --data)."""
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 2
    line = _error(capsys)
    assert "nowhere: no such directory" in line and _check(line, {"data check"}) == [], line
    assert main(["data", "check", "synthetic:size=abc"]) == 2
    line = _error(capsys)
    assert "size=abc is not a size" in line and _check(line, {"data check"}) == [], line
    assert main(["train", "--data", str(tmp_path / "nowhere")]) == 2
    assert "--data " in _error(capsys)


def test_export_calibrate_of_a_missing_folder_names_calibrate_not_data(tmp_path, capsys):
    """`transeg export M q.onnx --int8 --calibrate nosuch` (export takes no --data; leaving --calibrate out is
    dynamic int8, not the synthetic set): the line names --calibrate and the flags export takes, said before the
    model is read (M need not exist). 2 runs: a missing folder and a bad synthetic option."""
    for spec, message in ((str(tmp_path / "nosuch"), "nosuch: no such directory (give a folder with images/, masks/ "
                           "and classes.txt, or --calibrate synthetic for the built-in synthetic set; leave "
                           "--calibrate out for dynamic int8)"),
                          ("synthetic:size=abc", "size=abc is not a size")):
        assert main(["export", str(tmp_path / "m.safetensors"), str(tmp_path / "q.onnx"), "--int8",
                     "--calibrate", spec]) == 2
        line = _error(capsys)
        assert f"--calibrate {spec}: " in line and message in line and _check(line, {"export"}) == [], line


def test_the_service_names_its_query_parameters_not_cli_flags():
    """A bad ISR setting sent to `transeg serve` is answered in the request's words (isr_encoder)."""
    from transeg import isr
    from transeg.errors import TransegError

    with pytest.raises(TransegError, match=r"^isr_encoder 2211: write the ratios comma-separated"):
        isr.parse_setting("2211", None, names=("isr_encoder", "isr_decoder"))
    source = (SRC / "serve" / "app.py").read_text()
    assert 'names=("isr_encoder", "isr_decoder")' in source

