"""Text from files, made safe to print on a terminal.

Class names (a dataset's classes.txt, a checkpoint's classes, a config.json's id2label) and other text
read from files reach the terminal through `printable`: control characters (ANSI escapes, NUL, newlines,
carriage returns, DEL, C1 controls) and the invisible format characters that reorder or hide text
(bidirectional overrides, zero-width characters) are written as Python escapes (`\\x1b`, `\\n`,
`\\u202e`), so a name can neither move the cursor, recolour nor clear the screen, nor split one line
into several.
"""
import unicodedata


def _escape(ch):
    code = ord(ch)
    if ch in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text):
    """`text` (any object: str() of it) with every control or format character written as its escape."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch == " " or unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn")
                   else _escape(ch) for ch in text)


def terminal_width():
    """The columns a table printed to stdout may use: the terminal's (`shutil.get_terminal_size`, which reads
    COLUMNS first), or None (no limit) when stdout is a file or a pipe and COLUMNS is not set, so that
    `transeg models --pretrained > zoo.txt` and grep get whole rows."""
    import os
    import shutil
    import sys

    if "COLUMNS" not in os.environ and not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size().columns


def _wrap(text, width):
    """`text` in lines of at most `width` characters, broken at spaces or after '/', '_' or '-' (URLs and
    repo ids), and anywhere in a piece longer than a line."""
    import re

    if len(text) <= width:
        return [text]
    lines, line = [], ""
    for piece in re.findall(r"\s+|[^\s/_-]*[/_-]|[^\s/_-]+", text):
        if piece.isspace():
            line += " " if line else ""
            continue
        if len(line) + len(piece) > width and line.strip():
            lines.append(line.rstrip())
            line = ""
        while len(piece) > width:
            lines.append(piece[:width])
            piece = piece[width:]
        line += piece
    return lines + ([line.rstrip()] if line.strip() else [])


def fit_table(header, rows, width=None, drop=(), wrap=(), gap=2):
    """A table's lines, columns aligned and `gap` spaces apart, fitted into `width` characters (None: as
    wide as its cells): first the columns named in `drop` are left out, in that order, until it fits; then
    the cells of the columns named in `wrap` are wrapped onto further lines (each column kept at least 12
    wide, or its header's width). Returns (lines, [names of the columns left out]). Cells are strings."""
    keep = list(range(len(header)))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in keep]

    def total():
        return sum(widths[i] for i in keep) + gap * (len(keep) - 1)

    dropped = []
    for name in drop:
        if width is None or total() <= width:
            break
        if name in header and header.index(name) in keep:
            keep.remove(header.index(name))
            dropped.append(name)
    wrapping = [header.index(n) for n in wrap if n in header and header.index(n) in keep]
    while width is not None and total() > width:
        shrinkable = [i for i in wrapping if widths[i] > max(12, len(header[i]))]
        if not shrinkable:
            break  # as narrow as it gets: the terminal wraps the rest
        widest = max(shrinkable, key=lambda i: widths[i])
        widths[widest] -= min(total() - width, widths[widest] - max(12, len(header[widest])))
    lines = []
    for row in [header, *rows]:
        cells = [_wrap(str(row[i]), widths[i]) if i in wrapping else [str(row[i])] for i in keep]
        for k in range(max(len(c) for c in cells)):
            lines.append((" " * gap).join((c[k] if k < len(c) else "").ljust(widths[i])
                                          for c, i in zip(cells, keep)).rstrip())
    return lines, dropped
