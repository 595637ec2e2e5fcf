"""The one exception type users see: a message that names the file, line or recipe key at fault."""

from __future__ import annotations


class ForgetlessError(Exception):
    """A user-facing error. The CLI prints its message without a traceback and exits with code 2."""


class DataError(ForgetlessError):
    """Bad training or evaluation data: the message names file and line."""


class RecipeError(ForgetlessError):
    """An invalid recipe: the message names the key path and what is valid."""


class OutputExistsError(ForgetlessError, FileExistsError):
    """An output would replace an existing file or directory without an explicit overwrite flag."""
