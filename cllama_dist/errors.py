"""The one exception type for problems a user can fix (bad input, bad config).

The CLI prints these as a single clear line and exits with status 2; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem with the user's input or configuration, described so that they can fix it."""
