"""The one exception type for user mistakes (bad config, missing file, corrupt checkpoint).

Entry points catch it, print its message as a single line and exit with status 2; anything
else is a bug and keeps its traceback.
"""


class BipError(Exception):
    """A user-facing error whose message is one self-explanatory line."""
