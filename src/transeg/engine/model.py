"""The model a run starts from: a fresh one of cfg.model, or cfg.pretrained's (fine-tuning)."""
from ..zoo import load
from ..protocol import Protocol
from ..registry import create_model


def build_model(cfg, train_set, log=None):
    """The model a run starts from: `cfg.pretrained`'s (fine-tuning: every weight from that checkpoint; a
    new classifier where the data has another number of classes, said in one line through `log`) or a
    fresh `cfg.model`."""
    classes, palette = list(train_set.classes), list(train_set.palette)
    if cfg.pretrained:
        model = load(cfg.pretrained)
        if model.num_classes != len(classes):
            model = _new_classifier(model, cfg.pretrained, len(classes), log)
        model.meta.update(classes=classes, palette=[list(c) for c in palette])
    else:
        model = create_model(cfg.model, num_classes=len(classes), classes=classes, palette=palette, **cfg.model_args)
    if cfg.backbone_weights:
        from ..convert import load_backbone_weights
        from ..zoo import backbone_weights
        load_backbone_weights(model, backbone_weights(cfg.backbone_weights))
    model.meta["dataset"] = cfg.data or "synthetic"
    model.protocol = Protocol(mode=cfg.test_mode, scale=cfg.test_scale, size_divisor=cfg.size_divisor,
                              crop=cfg.test_crop, stride=cfg.test_stride, min_short_side=cfg.min_short_side,
                              ms_scales=cfg.ms_scales, ms_flip=cfg.ms_flip)
    return model


def _new_classifier(source, path, num_classes, log=None):
    """`source` (a loaded checkpoint) rebuilt for `num_classes` classes: every tensor whose shape does not
    depend on the class count is copied, the others (the classifier) start from their fresh initialisation."""
    meta = source.meta
    args = {k: v for k, v in meta.get("model_args", {}).items() if k != "num_classes"}
    model = create_model(meta["variant"], num_classes=num_classes, **args)
    fresh, weights = model.state_dict(), source.state_dict()
    kept = {k: v for k, v in weights.items() if k in fresh and fresh[k].shape == v.shape}
    new = [k for k in fresh if k not in kept]
    model.load_state_dict({**fresh, **kept})
    model.meta.update({k: v for k, v in meta.items() if k not in ("model_args", "classes", "palette")})
    if log is not None:
        more = f" (+{len(new) - 4} more)" if len(new) > 4 else ""
        log(f"{path}: {source.num_classes} classes, the data has {num_classes}: a new classifier for the "
            f"{num_classes} classes starts afresh ({', '.join(new[:4])}{more}); every other weight comes from {path}")
    return model
