"""Atomic directory outputs: build in a temporary sibling, then rename into place, so a crash or a full disk
during a save leaves the previous good copy (or nothing) -- never a half-written directory."""

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def current_umask():
    """The process umask. Read from /proc where it can be (os.umask can only be read by setting it, which
    for a moment gives files created by other threads the wrong mode)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def check_output_dir(output_dir, overwrite=False):
    """Refuse an existing non-empty output directory (or a file there) unless `overwrite`; callers run it before
    any slow work too, so the refusal comes first."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"Output path {str(path)!r} exists and is not a directory; choose another path.")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"Output directory {str(path)!r} already exists and is not empty; pass "
                              "overwrite=True (--overwrite) to replace it, or choose another directory.")
    return path


@contextlib.contextmanager
def atomic_directory(final_path, overwrite=False):
    """Yield a temporary directory; on success it replaces `final_path` in one rename.

    An existing non-empty `final_path` is refused unless `overwrite`; it is moved aside (not deleted) until the new
    directory is in place, and restored if anything fails.
    """
    path = check_output_dir(final_path, overwrite).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it private; outputs get the user's normal permissions
    old = None
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / "dir")
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not path.exists():
            os.replace(old / "dir", path)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path, text):
    """Write a text file through a temporary sibling and a rename. The file gets the mode a plain `open()` would
    give it (0666 less the umask): mkstemp's private 0600 would hide model cards, arguments and cache metadata
    from the other users of a shared folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
