"""Outputs are written atomically and never replace what the user has unless asked."""
import os
from pathlib import Path

import pytest

from circuitlab.errors import CircuitlabError
from circuitlab.files import locked, refuse_overwrite, staged, write_atomic, write_text


def test_refuse_overwrite_names_the_first_clash(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.png"
    refuse_overwrite([a, b], force=False)                 # nothing there: fine
    b.write_text("mine")
    with pytest.raises(CircuitlabError, match=r"b\.png exists \(1 output file\(s\) would be "
                                              r"replaced\); choose another --out or pass --force"):
        refuse_overwrite([a, b], force=False)
    with pytest.raises(CircuitlabError, match=r"exists \(not replaced\); pass overwrite=True"):
        refuse_overwrite([b], force=False, hint="pass overwrite=True")
    refuse_overwrite([a, b], force=True)
    assert b.read_text() == "mine"


def test_an_output_under_a_file_is_refused_even_with_force(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(CircuitlabError, match=r"notes\.txt is a file, so .*metrics\.json "
                                                  r"cannot be written; pass --out a folder"):
            refuse_overwrite([tmp_path / "notes.txt" / "run" / "metrics.json"], force=force)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_folder_where_a_file_goes_is_refused_even_with_force(tmp_path):
    (tmp_path / "a.csv").mkdir()
    for force in (False, True):
        with pytest.raises(CircuitlabError, match=r"a\.csv is a folder where a file is to be "
                                                  r"written"):
            refuse_overwrite([tmp_path / "a.csv"], force=force)


def test_an_unwritable_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    # root may write anywhere, so the permission answer is the one os.access gives
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(tmp_path))
    with pytest.raises(CircuitlabError, match="is not writable"):
        refuse_overwrite([tmp_path / "run" / "metrics.json"], force=True)
    monkeypatch.setattr(os, "access", lambda path, mode: True)
    refuse_overwrite([tmp_path / "run" / "metrics.json"], force=False)      # fine when it is


def test_write_atomic_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "sub" / "table.csv"
    write_text(path, "old\n")
    assert path.read_text() == "old\n"

    def broken(f):
        f.write(b"half a ta")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, broken)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.csv"]  # no temp file left


def test_written_files_get_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "x.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "x.txt").stat().st_mode & 0o777 == 0o644


def test_a_folder_the_system_refuses_is_one_clear_error(tmp_path, monkeypatch):
    """A read-only or virtual file system (--out under /proc) refuses what os.access allows
    root: every writer answers with one CircuitlabError naming the folder and why."""
    import errno
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    new = tmp_path / "new"
    attempts = [lambda: write_text(new / "a.txt", "x"),
                lambda: locked(new / "o").__enter__(),
                lambda: staged(new / "o", ["a.txt"]).__enter__()]
    with monkeypatch.context() as m:
        m.setattr(Path, "mkdir", refuse)
        for attempt in attempts:
            with pytest.raises(CircuitlabError, match="cannot write in the folder .*new "
                                                      r"\(Read-only file system\)"):
                attempt()
    new.mkdir()                                  # the folder is there, files cannot be made
    for name in ("mkstemp", "mkdtemp"):
        with monkeypatch.context() as m:
            m.setattr(tempfile, name, refuse)
            with pytest.raises(CircuitlabError, match="cannot write in the folder"):
                (attempts[0] if name == "mkstemp" else attempts[2])()
    with monkeypatch.context() as m:
        m.setattr(os, "open", refuse)
        with pytest.raises(CircuitlabError, match="cannot write in the folder"):
            attempts[1]()
