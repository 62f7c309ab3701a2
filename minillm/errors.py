"""One exception type for every problem a user can fix (bad files, bad settings, bad input).

The CLI prints its message on one line and exits with status 2; anything else is a bug and keeps its
traceback.
"""


class MinillmError(Exception):
    """A problem with the user's input, named in one line together with what to do about it."""
