"""The one exception type that means "the user asked for something wrong" (exit 2, one line)."""


class UserError(Exception):
    """Bad input: recipe, usage or data. The CLI prints the message on one line and exits 2.

    The message names the field, the value and the fix.
    """
