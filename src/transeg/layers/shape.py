"""Size arithmetic that stays exact in exported graphs."""


def round_up(n, m):
    """n rounded up to a multiple of m. Written without negative operands (not `-(-n // m) * m`):
    torch.onnx turns a symbolic `//` into ONNX's integer Div, which truncates towards zero, so a
    ceiling through negatives comes out one multiple short at every size the trace did not see."""
    return (n + m - 1) // m * m
