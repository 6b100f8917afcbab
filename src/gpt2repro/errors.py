"""The one exception type that reaches the user as a single line.

Anything a user can fix (a bad flag, a truncated shard, a corrupt checkpoint)
raises ``UserError`` with a message that names the file or flag and the fix.
``cli.main`` prints it as one line and exits non-zero; ``--debug`` shows the
traceback instead.
"""


class UserError(Exception):
    """A problem with the user's input or files, reported without a traceback."""

    exit_code = 2
