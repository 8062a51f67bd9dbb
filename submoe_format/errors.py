"""The one base class of every error a user can fix (bad input, bad checkpoint, bad settings).

Every package's own errors derive from it, so the `submoe` CLI turns any of them into one line
and exit status 2, and never a traceback; anything else is a bug and keeps its traceback."""


class SubMoEError(ValueError):
    """A problem with what the user gave (a file, a checkpoint, an option), with what to do about it."""
