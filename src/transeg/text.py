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
