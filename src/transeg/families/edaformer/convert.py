"""The authors' EDAFormer checkpoints (hyunwoo137/EDAFormer, mmcv 1.x `.pth`) -> transeg.

transeg keeps the authors' module names, so the mapping is the identity except that the unused
`decode_head.conv_seg` is dropped. The variant is recognised from the encoder's widths and depths
and the decoder's fuse width. Pooling ratios and ISR are not in the weights: a converted model runs
with the trained pooling, and `set_isr` / `--isr-*` change it at inference.
"""
from ...convert.mmseg import class_info, head_shape, match_variant, read_mmseg_state, stage_shapes, test_protocol

DESCRIPTION = "the authors' hyunwoo137/EDAFormer .pth (mmcv layout: {'state_dict', 'meta'})"


def convert(obj, source, model=None):
    """obj: what `torch.load` returned. Returns dict(variant, num_classes, state, classes, palette)."""
    state, classes, palette = read_mmseg_state(obj, source, "EFT")
    dims, depths = stage_shapes(state, source, "EDAFormer")
    decoder_dim, num_classes = head_shape(state, source, "EDAFormer")
    variant = model or match_variant("edaformer", source, embed_dims=dims, depths=depths, decoder_dim=decoder_dim)
    return dict(variant=variant, num_classes=num_classes, state=state, test=test_protocol(num_classes),
                **class_info(classes, palette, num_classes))
