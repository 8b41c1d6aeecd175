"""User errors: bad input is reported as one line and a non-zero exit, never a traceback."""

import functools
import sys
from typing import Callable, TypeVar

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user (a file, a flag, a config value); the message names it."""


def exits_cleanly_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wraps an absl `main`: a UserError prints `error: <message>` on stderr and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
