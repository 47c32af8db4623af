"""The one exception type that reaches users as a sentence instead of a traceback."""


class UserError(Exception):
    """Bad input the user can fix: config keys, data lines, paths, mismatched tokenizers.

    The CLI prints ``str(error)`` and exits non-zero; ``--debug`` shows the traceback.
    """
