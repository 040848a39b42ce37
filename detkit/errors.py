"""The one base class of errors caused by user input (a broken dataset, a missing setting, an encoder file that does
not fit, a misspelled config key, ...).

Every entry point catches :class:`UserError` (and :class:`FileNotFoundError`) and reports it as one line with exit
status 1 instead of a traceback; anything else is a bug and keeps its traceback. The concrete errors live beside
the code that raises them and keep their builtin base (``ValueError``, ``RuntimeError``) for callers that catch
those. This module imports nothing from detkit: every floor may raise a user error.
"""

from __future__ import annotations


class UserError(Exception):
    """An error in what the user gave detkit; ``str(error)`` is the complete message to show."""


#: What the command-line entry points report as one message with exit status 1.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError)
