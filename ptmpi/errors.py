"""Errors meant for the user."""


class UserError(Exception):
    """An error the user can fix (bad input, existing output, ...): one line, no traceback."""
