"""Decode heads more than one family builds on: Mask2Former's pixel and masked-attention decoders, its
semantic scoring and its set criterion. A family's own head lives in its package (`transeg.families`)."""
