"""User-facing errors: one clear line, no traceback.

Raise :class:`UserError` for anything the user can fix (bad paths, bad config values, inputs that
do not fit); the runner prints ``error: <message>`` and exits with status 2.
"""


class UserError(Exception):
    """A problem with the user's input or configuration, reported as one line."""
