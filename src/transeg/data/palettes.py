"""Colour palettes for drawing label maps.

`default_palette` is the PASCAL VOC scheme: the bits of the class index are dealt out, three at
a time, to the most significant bits of R, G and B. It is deterministic, gives every index below
2**24 its own colour, and its first colours (black, maroon, green, olive, navy, ...) are the ones
people already know from VOC visualisations.
"""


def default_palette(n):
    """`n` distinct RGB colours; entry 0 is black (the VOC background colour)."""
    if n < 0:
        raise ValueError(f"default_palette: n must be >= 0, got {n}")
    palette = []
    for index in range(n):
        r = g = b = 0
        c = index
        for bit in range(7, -1, -1):  # the lowest bits of the index land in the highest bits
            r |= (c & 1) << bit
            g |= ((c >> 1) & 1) << bit
            b |= ((c >> 2) & 1) << bit
            c >>= 3
        palette.append((r, g, b))
    return palette
