"""The one exception type users see.

Everything that is the user's fault (a bad file, a wrong name, a mismatched checkpoint) raises
`TransegError` with a one-line message that names the file and the problem; the CLI prints the
message and exits with status 2 instead of showing a traceback.
"""


class TransegError(Exception):
    """A user-facing error: the message is one line and says what to fix."""
