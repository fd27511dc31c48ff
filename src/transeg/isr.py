"""Inference spatial reduction (ISR; Yu et al., EDAFormer, ECCV 2024, Sec. 3.3) for any model whose
attention pools its keys/values.

A model trained with key/value pooling ratio p can, at inference, pool by p × r instead: the
weights that act on the pooled tokens (a 1x1 conv, a LayerNorm, a Linear) do not depend on the
pooling ratio, so nothing is retrained; only K/V get coarser and attention gets cheaper. Queries
and therefore every output resolution are unchanged.

    model.set_isr(encoder=(2, 2, 1, 1), decoder=(2, 2, 2))   # EDAFormer's "optimal" setting
    model.set_isr()                                          # back to the trained pooling

A setting is complete: a part not given goes back to 1. The ratios index the groups a model exposes
through `isr_pools()` on its backbone (one group per encoder stage, in order) and on its head
(EDAFormer: the branches on c2, c3, c4, the authors' `--decoder_reduction_ratios` order). The
meaning is the authors' `--backbone_reduction_ratios 2211 --decoder_reduction_ratios 222`, with any
positive integer rather than one digit per stage. SegFormer's strided-conv reduction gets ISR as an
average pooling before the conv (the paper's Table 7); its head has no attention, so no decoder ratios.
"""
import contextlib
import numbers

from .errors import TransegError

PARTS = ("encoder", "decoder")

# The settings `transeg bench --isr-sweep` measures: the trained one, the paper's optimum
# (2,2,1,1)/(2,2,2) of the authors' README, and settings around it, up to the coarsest the authors'
# configs allow (encoder × decoder multipliers).
SWEEP = [
    ((1, 1, 1, 1), (1, 1, 1)), ((2, 1, 1, 1), (1, 1, 1)), ((2, 2, 1, 1), (1, 1, 1)), ((1, 1, 1, 1), (2, 2, 2)),
    ((2, 2, 1, 1), (2, 2, 2)), ((4, 2, 1, 1), (2, 2, 2)), ((2, 2, 2, 1), (2, 2, 2)), ((4, 4, 2, 1), (2, 2, 2)),
    ((4, 4, 2, 2), (2, 2, 2)), ((8, 4, 2, 1), (2, 2, 2)),
]


def pool_groups(model):
    """{"encoder": [[KeyValuePool, ...] per stage], "decoder": [... per branch]} (empty lists when a
    part has no pooled attention)."""
    return {part: (getattr(module, "isr_pools", None) or list)()
            for part, module in zip(PARTS, (model.backbone, model.decode_head))}


def _name(model):
    return model.meta.get("variant") or type(model.backbone).__name__


def _check(model, part, ratios, groups):
    if ratios is None:
        return (1,) * len(groups)
    try:
        ratios = tuple(ratios)
    except TypeError:
        ratios = (ratios,)
    if not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) and r >= 1 for r in ratios):
        raise TransegError(f"ISR {part} ratios must be positive integers, got {ratios}")
    if not groups:
        if all(r == 1 for r in ratios):
            return ()
        where = "backbone" if part == "encoder" else "decode head"
        raise TransegError(f"{_name(model)}: its {where} has no attention that pools keys/values, so ISR {part} "
                           "ratios do not apply")
    if len(ratios) != len(groups):
        what = "stage" if part == "encoder" else "decoder branch"
        raise TransegError(f"{_name(model)}: ISR {part} needs {len(groups)} ratios (one per {what}), got {len(ratios)}: "
                           f"{','.join(map(str, ratios))}")
    return tuple(int(r) for r in ratios)


def check_setting(model, encoder=None, decoder=None):
    """The setting as `set_isr` would apply it ({"encoder": (..), "decoder": (..)}, 1 where not given),
    or a TransegError saying why it does not fit `model`; the model is not changed."""
    groups = pool_groups(model)
    return {part: _check(model, part, r, groups[part]) for part, r in zip(PARTS, (encoder, decoder))}


def setting_reader(model):
    """A callable giving `model`'s ISR multipliers as a tuple, cheaply (its pooling modules found once): what the
    compiled path checks on every call, where `get_isr`'s walk over the modules costs ~20 us."""
    pools = [pool for part in PARTS for group in pool_groups(model)[part] for pool in group]
    return lambda: tuple(pool.isr for pool in pools)


def set_isr(model, encoder=None, decoder=None):
    """Pool keys/values `encoder[i]` (`decoder[j]`) times harder than trained; None means 1 everywhere.
    Validated before anything changes, so a bad setting leaves the model as it was."""
    groups = pool_groups(model)
    checked = check_setting(model, encoder, decoder)
    for part in PARTS:
        for pools, r in zip(groups[part], checked[part]):
            for pool in pools:
                pool.isr = r
    return model


@contextlib.contextmanager
def isr_setting(model, setting=None):
    """`with isr_setting(model, {"encoder": (2, 2, 1, 1)}):` ISR for the block, the previous setting
    after it; None changes nothing."""
    if not setting:
        yield model
        return
    unknown = sorted(set(setting) - set(PARTS)) if isinstance(setting, dict) else None
    if unknown is None or unknown:
        given = ", ".join(map(repr, unknown)) if unknown else repr(setting)
        raise TransegError(f"isr: {given} is not an ISR setting; give a dict with 'encoder' and/or 'decoder', "
                           "e.g. {'encoder': (2, 2, 1, 1), 'decoder': (2, 2, 2)}")
    previous = get_isr(model)
    set_isr(model, **setting)
    try:
        yield model
    finally:
        set_isr(model, **{part: r or None for part, r in previous.items()})


def get_isr(model):
    """The current multipliers: {"encoder": (..), "decoder": (..)}; () for a part without pooling."""
    return {part: tuple(pools[0].isr for pools in groups) for part, groups in pool_groups(model).items()}


def effective_pooling(model):
    """How much each group's keys/values are now reduced per side (trained reduction × ISR), e.g.
    EDAFormer-T encoder (16, 8, 2, 1) at 2,2,1,1."""
    return {part: tuple(pools[0].kv_reduction for pools in groups) for part, groups in pool_groups(model).items()}


def is_default(setting):
    return all(r == 1 for part in PARTS for r in setting.get(part, ()))


def describe(setting):
    """"ISR encoder 2,2,1,1 / decoder 2,2,2", or "no ISR" for the trained pooling."""
    if is_default(setting):
        return "no ISR"
    parts = [f"{part} {','.join(map(str, setting[part]))}" for part in PARTS if setting.get(part)]
    return "ISR " + " / ".join(parts)


def parse_ratios(text, what="--isr-encoder"):
    """"2,2,1,1" -> (2, 2, 1, 1). The authors' one-digit-per-stage form ("2211", "222") is refused with the
    spelling to use: a ratio of 100 or more is never meant, but "16" may be."""
    text = text.strip()
    if "," not in text and text.isdigit() and len(text) >= 3:
        raise TransegError(f"{what} {text}: write the ratios comma-separated, e.g. {','.join(text)}")
    try:
        ratios = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise TransegError(f"{what} {text!r}: expected comma-separated positive integers, e.g. 2,2,1,1") from None
    if any(r < 1 for r in ratios):
        raise TransegError(f"{what} {text!r}: ratios must be positive integers")
    return ratios


def parse_setting(encoder=None, decoder=None, names=("--isr-encoder", "--isr-decoder")):
    """The command line's `--isr-encoder 2,2,1,1 --isr-decoder 2,2,2` as a setting for `set_isr`
    ({"encoder": (2, 2, 1, 1), "decoder": (2, 2, 2)}), or None when neither is given. `names`: what errors
    call the two values (the service's query parameters are isr_encoder / isr_decoder)."""
    if encoder is None and decoder is None:
        return None
    return {"encoder": parse_ratios(encoder, names[0]) if encoder else None,
            "decoder": parse_ratios(decoder, names[1]) if decoder else None}


def pooling_text(pooling):
    """{"encoder": (16, 8, 2, 1), "decoder": (8, 4, 2)} -> "encoder 16,8,2,1; decoder 8,4,2"."""
    return "; ".join(f"{part} {','.join(map(str, r))}" for part, r in pooling.items() if r)


def sweep_settings(model):
    """The SWEEP settings this model can take (decoder part dropped for models without one), unique."""
    groups = pool_groups(model)
    if not groups["encoder"] and not groups["decoder"]:
        raise TransegError(f"{_name(model)}: no attention that pools keys/values, so there is nothing for ISR to sweep")
    out = []
    for enc, dec in SWEEP:
        setting = {"encoder": enc[:len(groups["encoder"])] if groups["encoder"] else (),
                   "decoder": dec[:len(groups["decoder"])] if groups["decoder"] else ()}
        if len(setting["encoder"]) == len(groups["encoder"]) and len(setting["decoder"]) == len(groups["decoder"]) \
                and setting not in out:
            out.append(setting)
    return out
