"""The one error family: every error that ncppo reports to a user as a single line derives from ``NcppoError``.

The command line prints an ``NcppoError`` (and the operating system's file errors) as ``ncppo: error: ...``
and exits with 2; anything else is a bug in ncppo and keeps its traceback. Each subclass also derives
from the built-in type a caller would expect (``ValueError`` for bad values, ``ImportError`` for a missing
package), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class NcppoError(Exception):
    """Base of every user-facing ncppo error; the message says what is wrong and where."""


class UsageError(NcppoError, ValueError):
    """A bad argument or option value; the message names it and the valid choices."""


class MissingDependencyError(NcppoError, ImportError):
    """An optional package is not installed; the message names the package and how to install it."""

    def __init__(self, package: str, purpose: str, extra: str | None = None):
        hint = f"pip install {package}" if extra is None else f"pip install 'ncppo[{extra}]'"
        super().__init__(f"{purpose} needs the optional package {package!r}: {hint}")
        self.package = package


class OutputDirError(NcppoError, FileExistsError):
    """A command refused to write its output folder where it would destroy or mix up other data."""


class StateError(NcppoError, RuntimeError):
    """A file the command depends on is damaged or from an incompatible run; the message names it."""


# the operating system's own file errors are user errors too: a wrong path, a full disk, no permission
USER_ERRORS: tuple[type[BaseException], ...] = (
    NcppoError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
)


class MissingWeightsError(NcppoError, FileNotFoundError):
    """A model's or reward's weights are not where the user said; the message says what is expected there."""
