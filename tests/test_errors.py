"""User errors: one line, exit 2, for bad paths as well as bad values."""

import errno
import os
import socket
import subprocess

import pytest

from nucgpt.errors import EXIT_USER_ERROR, UserError, exits_cleanly_on_user_error
from nucgpt.files import check_can_create


def _main_raising(error: BaseException):
    @exits_cleanly_on_user_error
    def main(argv):
        raise error

    return main


def test_an_os_error_about_a_file_is_one_line_naming_it(capsys):
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/shard-00001.array_record")
    with pytest.raises(SystemExit) as exit_info:
        _main_raising(full)(["prog"])
    assert exit_info.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: /data/out/shard-00001.array_record: No space left on device\n"


def test_ctrl_c_is_one_line_exit_130(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _main_raising(KeyboardInterrupt())(["prog"])
    assert exit_info.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_an_os_error_without_a_file_is_not_hidden():
    with pytest.raises(ConnectionResetError):
        _main_raising(ConnectionResetError("peer went away"))(["prog"])


def test_check_can_create(tmp_path):
    check_can_create(str(tmp_path / "new" / "deeper" / "out.fa"), "--out", folder=False)  # missing folders are fine
    check_can_create(str(tmp_path / "new" / "workdir"), "--workdir", folder=True)
    assert not (tmp_path / "new").exists()  # and nothing is created
    (tmp_path / "a_file").write_text("")
    check_can_create(str(tmp_path / "a_file"), "--output", folder=False)  # an existing file is replaced
    with pytest.raises(UserError, match=r"^--workdir .*/a_file: is a file, not a folder$"):
        check_can_create(str(tmp_path / "a_file"), "--workdir", folder=True)
    with pytest.raises(UserError, match=r"^--output .*/new_dir: is a folder, not a file$"):
        (tmp_path / "new_dir").mkdir()
        check_can_create(str(tmp_path / "new_dir"), "--output", folder=False)
    with pytest.raises(UserError, match=r"^--out .*/a_file/x: .*/a_file is a file, not a folder$"):
        check_can_create(str(tmp_path / "a_file" / "x"), "--out", folder=False)
    if os.geteuid() != 0:  # root may write anywhere
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        with pytest.raises(UserError, match="is not writable"):
            check_can_create(str(read_only / "x"), "--output", folder=True)


def test_synthetic_genome_under_a_file_is_refused_and_writes_nothing(tmp_path):
    from nucgpt.data import synthetic

    (tmp_path / "a_file").write_text("")
    with pytest.raises(UserError, match="is a file, not a folder"):
        synthetic.write_genome(tmp_path / "a_file" / "g.fa", bp=1000, seed=0)
    synthetic.write_genome(tmp_path / "g.fa.gz", bp=1000, seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "g.fa.gz"]  # no temporary left beside it


def test_temporary_folders_of_killed_runs_are_removed_by_the_next(tmp_path):
    """A prepare killed mid-write leaves `.out.tmp-<pid>`; the next run for that output removes it
    when the process is gone, and never one of a live process or of another output."""
    from nucgpt.files import sibling_tmp_folder

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid no process holds now
    host = socket.gethostname()
    stale = [tmp_path / f".out.tmp-{host}-{dead.pid}"]
    kept = [tmp_path / f".out.tmp-{host}-{os.getppid()}", tmp_path / f".other.tmp-{host}-{dead.pid}",
            tmp_path / f".out.tmp-otherhost-{dead.pid}",  # another host's: cannot be told dead from here
            tmp_path / f".out.tmp-{host}-{dead.pid}.old"]  # a previous output caught mid-replace: maybe the only copy
    for folder in stale + kept:
        folder.mkdir()
    fresh = sibling_tmp_folder(str(tmp_path / "out"))
    assert fresh == str(tmp_path / f".out.tmp-{host}-{os.getpid()}")
    assert not any(folder.exists() for folder in stale) and all(folder.exists() for folder in kept)
