"""User errors: bad input is reported as one line and a non-zero exit, never a traceback."""

import functools
import os
import re
import signal
import sys
from typing import Callable, TypeVar

from absl import flags, logging

T = TypeVar("T")

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input from the user (a file, a flag, a config value); the message names it."""


def exits_cleanly_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Wraps an absl `main`: a UserError prints `error: <message>` on stderr and exits 2; so does an
    OSError about a named file (a full disk, a path that vanished): the file and the reason, one line.
    Output piped into a reader that stops early (`| head`) ends the program quietly, exit 141;
    Ctrl-C prints `interrupted`, exit 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            message = str(e)
        except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback; outputs are whole or absent anyway
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(128 + signal.SIGINT)
        except BrokenPipeError:  # stdout piped into `head`: stop quietly, as a Unix tool would
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail too
            sys.exit(128 + signal.SIGPIPE)
        except OSError as e:
            if e.filename is None:
                raise
            message = f"{e.filename}: {e.strerror or e}"
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)

    return wrapper


def _unloadable_config_file() -> str | None:
    """ml_collections defers a config file it cannot read (missing, a folder) to the config's first
    use, where it raises from deep inside the run: report it before anything starts."""
    for name in flags.FLAGS:
        flag = flags.FLAGS[name]
        if not hasattr(flag, "config_filename"):
            continue
        try:
            error = object.__getattribute__(flag.value, "_error")  # ml_collections' placeholder
        except AttributeError:
            continue
        reasons = re.findall(r"\[Errno \d+\] ([^:\n]+)", str(error))
        return f"--{name} {flag.config_filename.split(':', 1)[0]}: cannot read the config file ({reasons[-1] if reasons else error})"
    return None


def _unknown_config_key(error: Exception, argv: list[str]) -> str:
    """config_flags' AttributeError / KeyError for an override of a key the config lacks, as one line."""
    key = re.search(r"'(\w+)", str(error))
    hint = re.search(r'Did you mean "(\w+)"', str(error))
    given = [a.split("=")[0][len("--config."):] for a in argv if key and a.startswith("--config.") and key[1] in a.split("=")[0]]
    name = given[0] if given else key[1] if key else str(error)
    return f"unknown config key {name}" + (f" (did you mean {name.rsplit('.', 1)[0]}.{hint[1]}?)" if hint and "." in name else "")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing (`app.run(main, flags_parser=parse_flags)`) with a bad flag, an unknown
    `--config.` key or a config file that cannot be loaded as one `error:` line and exit 2."""
    try:
        remaining = flags.FLAGS(argv)
        message = _unloadable_config_file()
        if message is None:
            return remaining
    except SyntaxError as e:  # a config file that is not valid Python
        message = f"--config {e.filename}:{e.lineno}: {e.msg} (not a valid Python config file)"
    except (AttributeError, KeyError) as e:
        if "has no attribute 'get_config'" in str(e):
            message = "--config: the config file defines no get_config() function"
        else:
            message = _unknown_config_key(e, argv)
    except flags.Error as e:
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        errors = [l for l in lines if "Error:" in l and not l.startswith("flag ")]
        message = errors[-1].split("Error: ", 1)[1] if errors else lines[0] if lines else "bad flags"
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def start_main(argv: list[str]) -> None:
    """A command's first step: the libraries' INFO logs (orbax, jax) hidden unless `--verbosity` is
    given, and no stray positional arguments."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
