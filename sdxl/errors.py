"""The one error base of the project: an error the user can fix, printed as one line without a traceback.

Every domain error (a bad captions file, model directory, recipe, encodings file, accuracy log, ...)
derives from :class:`UserError`, so the command line catches one type. Domain errors keep the builtin
base they had (``ValueError``, ``RuntimeError``) for code that catches those.
"""


class UserError(Exception):
    """An error caused by the user's input (a missing file, a bad flag value): one line, exit code 2."""
