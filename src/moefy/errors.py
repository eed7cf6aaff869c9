"""The one exception type users see: the CLI prints its message as a single line and exits non-zero."""


class MoefyError(Exception):
    """A problem with the user's input or environment, explained in one line."""
