"""The one exception type users see.

Everything that is the user's fault (a bad file, a wrong name, a mismatched checkpoint) raises
`TransegError` with a one-line message that names the file and the problem; the CLI prints the
message and exits with status 2 instead of showing a traceback.
"""


class TransegError(Exception):
    """A user-facing error: the message is one line and says what to fix."""


class UnknownVariant(TransegError):
    """A converter found weights that no registered variant builds (`convert.mmseg.match_variant`). How to
    name the variant differs by caller, so the message ends in `naming(how)`: by default the Python API's
    `model=NAME`; `transeg convert` says --model, the zoo names the `transeg convert` command that takes it."""

    def __init__(self, source, what, names=""):
        self.source, self.what, self.names = source, what, names
        super().__init__(self.naming("pass model=NAME"))

    def naming(self, how):
        """The message ending in `how` (e.g. "pass --model"), then the names that fit (" (an eomt-* name)")."""
        return f"{self.source}: {self.what} matches no registered variant; {how}{self.names}"
