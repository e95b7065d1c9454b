"""The one exception type for problems a user can cause and fix.

The CLI and the UI show its message as it is (no traceback), so the message must say what went
wrong and what to do about it.
"""


class EngramError(Exception):
    """A problem with the user's input or setup, with a message that says what to do."""
