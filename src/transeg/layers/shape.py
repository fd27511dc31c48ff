"""Shape and size helpers that stay exact and cheap in exported graphs."""


def tokens_to_map(x, hw):
    """(N, H*W, C) -> (N, C, H, W), as a channels-last view: no copy. Convolutions, pooling and
    interpolation take channels-last input natively (and return it), so the token <-> map round
    trips of the hierarchical encoders cost nothing instead of two transposing copies each."""
    n, _, c = x.shape
    return x.reshape(n, hw[0], hw[1], c).permute(0, 3, 1, 2)


def map_to_tokens(x):
    """(N, C, H, W) -> (N, H*W, C); free for a channels-last map, one copy otherwise."""
    n, c = x.shape[:2]
    return x.permute(0, 2, 3, 1).reshape(n, -1, c)


def round_up(n, m):
    """n rounded up to a multiple of m. Written without negative operands (not `-(-n // m) * m`):
    torch.onnx turns a symbolic `//` into ONNX's integer Div, which truncates towards zero, so a
    ceiling through negatives comes out one multiple short at every size the trace did not see."""
    return (n + m - 1) // m * m
