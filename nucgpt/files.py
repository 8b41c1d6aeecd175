"""Output files and folders that appear whole or not at all, and output paths checked up front."""

import contextlib
import os
import re
import shutil
import socket
from typing import IO, Iterator

from nucgpt.errors import UserError


def check_can_create(path: str, flag: str, *, folder: bool) -> None:
    """`path` can be written: a folder (written into) or a file (replaced by a rename beside it).
    Checked before long work, so a bad output path fails first, not last."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        if folder != os.path.isdir(path):
            raise UserError(f"{flag} {path}: is a {'file' if folder else 'folder'}, not a {'folder' if folder else 'file'}")
        target = path if folder else os.path.dirname(path)
    else:
        target = os.path.dirname(path)
        while not os.path.exists(target):
            target = os.path.dirname(target)
        if not os.path.isdir(target):
            raise UserError(f"{flag} {path}: {target} is a file, not a folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {target} is not writable")


def check_replaceable(path: str, flag: str, *, overwrite: bool, marker: str, what: str) -> None:
    """An existing `path` is replaced only with --overwrite, and only when it is empty or holds `marker`
    (the file that makes it `what`): a mistyped --overwrite must not delete a folder we did not write."""
    if not os.path.exists(path):
        return
    if not overwrite:
        raise UserError(f"{flag} {path} already exists; choose a new folder or pass --overwrite")
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, marker)):
        raise UserError(f"{flag} {path}: not {what} (no {marker}); --overwrite replaces only those, "
                        "so this folder is left as it is")


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "w") -> Iterator[IO]:
    """Opens a new file beside `path` (its folders made) for writing (`w` or `wb`); when the block
    ends without an error it is renamed over `path`, otherwise removed."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_input_file(path: str, flag: str) -> None:
    """`path` is an existing file; a folder or a missing path is one line naming `flag`."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: {'is a folder' if os.path.isdir(path) else 'no such file'}")


def sibling_tmp_folder(out_dir: str) -> str:
    """A fresh hidden folder beside `out_dir` (its parent made) to write into before `replace_folder`;
    made with the umask's mode, as every other output (mkdtemp's would be private, 0700)."""
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_tmp_folders(parent, os.path.basename(out_dir))
    tmp_dir = os.path.join(parent, f".{os.path.basename(out_dir)}.tmp-{socket.gethostname()}-{os.getpid()}")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    return tmp_dir


def _remove_stale_tmp_folders(parent: str, name: str) -> None:
    """Hidden temporary folders of earlier runs on this host for the same output whose process is gone
    (killed mid-write): the work they held is lost anyway, and they would stay forever. Another
    host's (a shared disk) cannot be told dead from here, and a `.old` folder (the previous output,
    moved while being replaced) may be the only copy: both stay."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.tmp-{re.escape(socket.gethostname())}-(\d+)$")
    for entry in os.listdir(parent):
        match = pattern.match(entry)
        if match and not _process_alive(int(match[1])):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def replace_folder(tmp_dir: str, out_dir: str) -> None:
    """Moves a finished folder into place; an old one (with --overwrite) goes only after that."""
    old = None
    if os.path.exists(out_dir):
        old = f"{tmp_dir}.old"
        os.rename(out_dir, old)
    os.rename(tmp_dir, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)
