"""fileio: atomic writes, temporaries of killed processes, path checks, OS errors and checksums."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pytest
import torch

from sparseforge import fileio
from sparseforge.errors import SparseforgeError
from sparseforge.fileio import (
    atomic_write,
    check_input_file,
    check_output_dir,
    check_output_file,
    checksum_table,
    clean_stale_temps,
    describe_os_error,
    tensor_checksum,
    verify_checksums,
)


def temps(folder: Path, name: str) -> list[str]:
    """Names of the temporary files of target ``name`` in ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}.sftmp-"))


def writer(content: bytes):
    return lambda tmp: Path(tmp).write_bytes(content)


def dead_pid() -> int:
    """The id of a process that has run and been reaped."""
    proc = subprocess.Popen([sys.executable, "-S", "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------ atomic_write
def test_success_leaves_only_the_target(tmp_path):
    out = tmp_path / "out.bin"
    assert atomic_write(out, writer(b"one")) == out
    assert out.read_bytes() == b"one"
    assert atomic_write(str(out), writer(b"two")) == out  # replaces an existing file
    assert out.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_inside_write_keeps_old_content_and_leaves_no_temp(tmp_path, exc):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    seen: list[str] = []

    def write(tmp: str) -> None:
        seen.append(tmp)
        Path(tmp).write_bytes(b"half of the new")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(out, write)
    assert out.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]
    # the temporary file was beside the target and named after it and this process
    assert Path(seen[0]).parent == tmp_path
    assert Path(seen[0]).name.startswith(f".out.bin.sftmp-{os.getpid()}-")


def test_oserror_inside_write_is_one_line_and_keeps_old_content(tmp_path):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SparseforgeError) as e:
        atomic_write(out, write, what="report")
    assert str(e.value) == f"report {str(out)!r}: no space left on the device"
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("where", ["mkstemp", "replace"])
def test_permission_denied_is_one_line(tmp_path, monkeypatch, where):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    with monkeypatch.context() as m:
        m.setattr(tempfile if where == "mkstemp" else os, where, denied)
        with pytest.raises(SparseforgeError) as e:
            atomic_write(out, writer(b"new"))
    assert str(e.value) == f"output {str(out)!r}: permission denied"
    assert out.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]


def test_missing_parent_folder_is_refused_not_created(tmp_path):
    out = tmp_path / "sub" / "out.bin"
    with pytest.raises(SparseforgeError) as e:
        atomic_write(out, writer(b"x"))
    assert str(e.value) == f"output {str(out)!r}: no such directory {str(out.parent)!r}"
    assert not out.parent.exists()


def test_written_file_has_the_umask_mode(tmp_path):
    umask = os.umask(0o022)
    try:
        out = atomic_write(tmp_path / "m.bin", writer(b"x"))
    finally:
        os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o644


# ------------------------------------------------------------------ stale temporaries
def test_stale_temp_of_a_dead_process_is_removed_on_the_next_write(tmp_path):
    live = subprocess.Popen([sys.executable, "-S", "-c", "import time; time.sleep(60)"])
    try:
        dead = dead_pid()
        stale = tmp_path / f".out.bin.sftmp-{dead}-abc"
        kept = [
            tmp_path / f".out.bin.sftmp-{os.getpid()}-abc",  # this process: may be writing now
            tmp_path / f".out.bin.sftmp-{live.pid}-abc",  # another live process
            tmp_path / f".other.bin.sftmp-{dead}-abc",  # another target's
            tmp_path / f".out.bin.bak.sftmp-{dead}-abc",  # another target's, with a longer name
            tmp_path / ".out.bin.sftmp-notapid-abc",  # not of the pattern
        ]
        for p in [stale, *kept]:
            p.write_bytes(b"leftover")
        atomic_write(tmp_path / "out.bin", writer(b"new"))
        assert not stale.exists()
        for p in kept:
            assert p.exists(), p.name
        assert (tmp_path / "out.bin").read_bytes() == b"new"
    finally:
        live.kill()
        live.wait()


def test_clean_stale_temps_returns_what_it_removed(tmp_path):
    dead = dead_pid()
    stale = tmp_path / f".x.pt.sftmp-{dead}-q1"
    stale.write_bytes(b"")
    mine = tmp_path / f".x.pt.sftmp-{os.getpid()}-q2"
    mine.write_bytes(b"")
    assert clean_stale_temps(tmp_path / "x.pt") == [stale]
    assert not stale.exists() and mine.exists()
    assert clean_stale_temps(tmp_path / "missing-folder" / "x.pt") == []


# The child imports sparseforge.fileio without the package's __init__ (which imports torch), so it
# starts in a few tens of milliseconds.
CHILD = r"""
import sys, time, types
pkg = types.ModuleType("sparseforge")
pkg.__path__ = [sys.argv[1]]
sys.modules["sparseforge"] = pkg
from sparseforge.fileio import atomic_write

def write(tmp):
    with open(tmp, "wb") as f:
        f.write(b"partial")
    print("writing", flush=True)
    time.sleep(60)

atomic_write(sys.argv[2], write)
"""


def test_sigkill_mid_write_leaves_a_temp_that_the_next_write_removes(tmp_path):
    out = tmp_path / "out.bin"
    out.write_bytes(b"old")
    package = str(Path(fileio.__file__).parent)
    child = subprocess.Popen([sys.executable, "-S", "-c", CHILD, package, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"  # returns once the write has begun
        left = temps(tmp_path, "out.bin")
        assert len(left) == 1 and left[0].startswith(f".out.bin.sftmp-{child.pid}-")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert temps(tmp_path, "out.bin") == left  # a killed process cannot clean up
    assert (tmp_path / left[0]).read_bytes() == b"partial"
    assert out.read_bytes() == b"old"
    atomic_write(out, writer(b"new"))
    assert temps(tmp_path, "out.bin") == []
    assert sorted(os.listdir(tmp_path)) == ["out.bin"] and out.read_bytes() == b"new"


# ------------------------------------------------------------------ path checks
def test_check_output_file_messages(tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    cases = {
        folder: f"output {str(folder)!r} is a directory; allowed: a file path",
        tmp_path
        / "no"
        / "o.pt": f"output {str(tmp_path / 'no' / 'o.pt')!r}: no such directory {str(tmp_path / 'no')!r}",
        a_file / "o.pt": f"output {str(a_file / 'o.pt')!r}: {str(a_file)!r} is not a directory",
    }
    for path, message in cases.items():
        with pytest.raises(SparseforgeError) as e:
            check_output_file(path)
        assert str(e.value) == message
    with pytest.raises(SparseforgeError) as e:
        check_output_file(tmp_path / "o.txt", "checkpoint", suffixes=(".pt", ".safetensors"))
    assert str(e.value) == f"checkpoint {str(tmp_path / 'o.txt')!r} has suffix '.txt'; allowed: .pt, .safetensors"
    assert check_output_file(str(tmp_path / "o.pt"), suffixes=(".pt",)) == tmp_path / "o.pt"
    assert sorted(os.listdir(tmp_path)) == ["d", "f.txt"]  # checking creates nothing


def test_check_output_file_permission_denied(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(SparseforgeError) as e:
        check_output_file(tmp_path / "o.pt")
    assert str(e.value) == f"output {str(tmp_path / 'o.pt')!r}: permission denied (cannot write in {str(tmp_path)!r})"


def test_check_input_file_messages(tmp_path):
    folder = tmp_path / "d.pt"
    folder.mkdir()
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    cases = {
        folder: f"input {str(folder)!r} is a directory; allowed: a file",
        tmp_path / "none.pt": f"input {str(tmp_path / 'none.pt')!r} does not exist",
        tmp_path
        / "no"
        / "x.pt": f"input {str(tmp_path / 'no' / 'x.pt')!r} does not exist (no such directory {str(tmp_path / 'no')!r})",
        a_file / "x.pt": f"input {str(a_file / 'x.pt')!r} does not exist ({str(a_file)!r} is a file, not a directory)",
    }
    for path, message in cases.items():
        with pytest.raises(SparseforgeError) as e:
            check_input_file(path, "input")
        assert str(e.value) == message
    assert check_input_file(str(a_file)) == a_file


def test_check_input_file_not_readable(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x")
    monkeypatch.setattr(os, "access", lambda *a, **k: False)
    with pytest.raises(SparseforgeError) as e:
        check_input_file(path)
    assert str(e.value) == f"file {str(path)!r}: permission denied (not readable)"


def test_check_output_dir_messages(tmp_path):
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    with pytest.raises(SparseforgeError) as e:
        check_output_dir(a_file)
    assert str(e.value) == f"output folder {str(a_file)!r} is a file; allowed: a folder"
    with pytest.raises(SparseforgeError) as e:
        check_output_dir(tmp_path / "new", create=False)
    assert str(e.value) == f"output folder {str(tmp_path / 'new')!r} does not exist"
    assert not (tmp_path / "new").exists()
    with pytest.raises(SparseforgeError) as e:  # cannot be created under a file
        check_output_dir(a_file / "sub")
    assert str(a_file / "sub") in str(e.value) and "not a directory" in str(e.value)
    made = check_output_dir(tmp_path / "a" / "b")
    assert made == tmp_path / "a" / "b" and made.is_dir()


def test_describe_os_error():
    assert str(describe_os_error(IsADirectoryError(errno.EISDIR, "x"), "/p", "model")) == "model '/p': is a directory"
    assert str(describe_os_error(OSError(errno.EROFS, "x"), "/p")) == "file '/p': read-only file system"
    assert str(describe_os_error(OSError("Disk Gone\nmore"), Path("/p"))) == "file '/p': Disk Gone"


# ------------------------------------------------------------------ checksums
def test_tensor_checksum_is_the_crc32_of_the_bytes_then_dtype_and_shape():
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    data = zlib.crc32(t.numpy().tobytes())
    assert tensor_checksum(t) == zlib.crc32(b"float32[3, 4]", data)
    assert tensor_checksum(t, layout=False) == data
    # logical (row-major) order, whatever the strides
    assert tensor_checksum(t.t(), layout=False) == zlib.crc32(t.t().contiguous().numpy().tobytes())
    assert tensor_checksum(t.reshape(4, 3)) != tensor_checksum(t)  # same bytes, other shape
    assert tensor_checksum(t.view(torch.int32)) != tensor_checksum(t)  # same bytes, other dtype
    assert tensor_checksum(torch.tensor(7, dtype=torch.int64)) == zlib.crc32(
        b"int64[]", zlib.crc32((7).to_bytes(8, "little"))
    )
    assert tensor_checksum(torch.tensor([True, False]), layout=False) == zlib.crc32(b"\x01\x00")
    assert tensor_checksum(torch.zeros(0, 3), layout=False) == 0
    assert tensor_checksum(torch.zeros(0, 3)) == zlib.crc32(b"float32[0, 3]")
    assert checksum_table({"a": t}) == {"a": zlib.crc32(b"float32[3, 4]", data)}
    assert checksum_table({"a": t}, layout=False) == {"a": data}


def test_verify_checksums_refuses_damage_with_one_line():
    good = {"w": torch.ones(3), "b": torch.zeros(2)}
    table = {"w": zlib.crc32(torch.ones(3).numpy().tobytes()), "b": zlib.crc32(torch.zeros(2).numpy().tobytes())}
    verify_checksums(good, table, "file 'x'", layout=False)  # passes: a bytes-only table
    with pytest.raises(SparseforgeError, match="tensor 'w' fails its checksum"):
        verify_checksums(good, table, "file 'x'")  # the default covers dtype and shape too
    damaged = {"w": torch.tensor([1.0, 2.0, 1.0]), "b": torch.ones(2)}
    with pytest.raises(SparseforgeError) as e:
        verify_checksums(damaged, table, "file 'x'", layout=False)
    assert str(e.value) == "file 'x': tensor 'w' fails its checksum (and 1 more) (the file is corrupted)"
    with pytest.raises(SparseforgeError) as e:
        verify_checksums({"w": good["w"]}, table, "file 'x'", lambda n: f"thing {n}")
    assert "not in the file: ['b']" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SparseforgeError) as e:
        verify_checksums(good, {"w": "abc", "b": 1}, "file 'x'")
    assert str(e.value) == "file 'x': its checksum table is not a {name: CRC-32} mapping (the file is corrupted)"
