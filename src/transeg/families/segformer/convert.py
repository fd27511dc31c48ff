"""The authors' SegFormer checkpoints (NVlabs/SegFormer, mmcv 1.x `.pth`) -> transeg.

transeg keeps the authors' module names, so the mapping is the identity except that the unused
`decode_head.conv_seg` is dropped. The variant is recognised from the tensor shapes (embed dims,
depths, decoder width) unless `--model` names it.
"""
from ...convert.mmseg import class_info, head_shape, match_variant, read_mmseg_state, stage_shapes, test_protocol

DESCRIPTION = "the authors' NVlabs/SegFormer .pth (mmcv layout: {'state_dict', 'meta'})"


def infer_segformer_variant(state, source):
    """(variant name, num_classes) from an official-layout state dict (keys with `backbone.`/`decode_head.`)."""
    dims, depths = stage_shapes(state, source, "SegFormer")
    decoder_dim, num_classes = head_shape(state, source, "SegFormer")
    return match_variant("segformer", source, embed_dims=dims, depths=depths, decoder_dim=decoder_dim), num_classes


def convert(obj, source, model=None):
    """obj: what `torch.load` returned. Returns dict(variant, num_classes, state, classes, palette, test)."""
    state, classes, palette = read_mmseg_state(obj, source, "MiT")
    variant, num_classes = infer_segformer_variant(state, source)
    short = 640 if (model or variant) == "segformer-b5" and num_classes == 150 else 512  # B5 ADE20K runs at 640
    return dict(variant=model or variant, num_classes=num_classes, state=state, test=test_protocol(num_classes, short),
                **class_info(classes, palette, num_classes))
