"""Files transeg reads and writes, handled safely.

Inputs are read only when they are regular files (a FIFO would wait for a writer forever, a device
never ends). Outputs are checked before any work is done (`output_folder`, `output_file`: writable,
never one of the inputs) and written atomically (`atomic_write`: a temporary beside the target, fsync,
rename), so a reader sees the old file or the new one and a full disk leaves the previous file intact.
Every problem is one `TransegError` line naming the file. A name longer than the file system takes (each
part of the path at most its NAME_MAX bytes, 255 on common file systems; the whole path at most
PATH_MAX, 4096) is refused by `output_file` / `output_folder` / `atomic_write` before any work, and the
temporary file beside an output uses at most `TMP_STEM` characters of its name, so any name the file
system takes can be written atomically.
"""
import os
import re
import stat
import tempfile
from pathlib import Path

from .errors import TransegError

TMP_STEM = 64  # characters of the output's name in its temporary's name (".NAME.XXXXXXXX.tmp")


def _short(path, keep=48):
    """`path` for a message, each part cut to `keep` characters (a 4,000-character name is no use to read)."""
    parts = [p if len(p) <= keep else p[:keep] + "..." for p in str(path).split(os.sep)]
    return os.sep.join(parts)


def check_name_length(path):
    """TransegError (one line) when `path`, or one of its parts, is longer than the file system allows
    (ENAMETOOLONG): NAME_MAX bytes per part of the nearest existing folder's file system, PATH_MAX in all."""
    path = Path(path)
    existing = next((p for p in (path.parent, *path.parent.parents) if _exists(p)), Path("."))
    try:
        name_max, path_max = os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    too_long = next((part for part in path.parts if len(os.fsencode(part)) > name_max), None)
    if too_long is not None:
        raise TransegError(f"{_short(path)}: a name of {len(os.fsencode(too_long)):,} bytes; this file system takes "
                           f"at most {name_max} per name (file name too long): choose a shorter one")
    if len(os.fsencode(str(path.absolute()))) >= path_max:
        raise TransegError(f"{_short(path)}: a path of {len(os.fsencode(str(path.absolute()))):,} bytes; at most "
                           f"{path_max - 1} (file name too long): choose a shorter one")
    return path


def _exists(path):
    try:
        return os.path.exists(path)
    except (OSError, ValueError):
        return False


def _kind(mode):
    """What a non-regular file is, for messages: "a FIFO (named pipe)", "a character device", ..."""
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def regular_file(path, name=None):
    """`path` if it is a regular file (or a link to one); else TransegError naming it (`name`) and what
    it is. Reading a FIFO would wait for a writer forever and a device never ends, so only regular
    files are read as inputs."""
    name = name or path
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        what = "a link to a missing file" if os.path.islink(path) else "no such file"
        raise TransegError(f"{name}: cannot read the image ({what})") from None
    except OSError as e:
        raise TransegError(f"{name}: cannot read the image ({_strerror(e)})") from None
    if not stat.S_ISREG(mode):
        raise TransegError(f"{name}: is {_kind(mode)}, not an image file")
    return path


def _strerror(e):
    """"read-only file system" from an OSError (its strerror, first letter lower case)."""
    text = e.strerror or str(e) or type(e).__name__
    return text[:1].lower() + text[1:]


def _probe(folder):
    """Create and remove a hidden file in `folder`: the one test of writability that also holds for
    root (who passes every permission check) and for read-only mounts."""
    fd, tmp = tempfile.mkstemp(prefix=".transeg-write-test-", dir=folder)
    os.close(fd)
    os.unlink(tmp)


def output_folder(path, inputs=(), create=True):
    """The folder `path` where outputs will be written, checked before any work is done: not a file,
    creatable and writable (create=False: checked on the nearest existing folder above it, nothing
    created), and holding none of `inputs`: outputs written beside the inputs could replace the user's
    own files of the same names (a_mask.png) and would be read back as inputs by the next run, so such
    a folder is refused rather than written into. Returns it as a Path; raises TransegError (one line)."""
    path = check_name_length(path)
    if path.exists() and not path.is_dir():
        raise TransegError(f"{path}: is a file, not a folder; outputs go to a folder (created if missing)")
    where = path.resolve()
    for f in inputs:
        if Path(f).parent.resolve() == where:
            raise TransegError(f"{path}: holds the input {Path(f).name}; outputs written there could replace "
                               f"your own files and be read back as inputs: write them to a folder of their own, "
                               f"e.g. {path / 'predictions'}")
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
            _probe(path)
        else:
            _probe(next(p for p in (path, *path.parents) if p.exists()))
    except OSError as e:
        raise TransegError(f"{path}: cannot write here ({_strerror(e)})") from None
    return path


def _umask():
    """The process's umask, read without changing it (os.umask sets it while reading it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def plain_permissions(path):
    """Give a file made by tempfile.mkstemp (mode 0600) the permissions a plain open() would have given
    it (0666 less the umask), so that an output written atomically is not private by accident."""
    os.chmod(path, 0o666 & ~_umask())


def replaceable(path):
    """Where writing `path` lands: the path itself, or the file a symbolic link there points to (the link is
    kept). Raises TransegError when that is something other than a regular file (a FIFO, a device, a socket):
    an output only ever creates a file or replaces a regular one, so a node such as /dev/full is never
    turned into a file."""
    path = check_name_length(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as e:
        raise TransegError(f"{path}: cannot write here ({_strerror(e)})") from None
    if stat.S_ISDIR(mode):
        raise TransegError(f"{path}: is a folder; give the file to write")
    if not stat.S_ISREG(mode):
        raise TransegError(f"{path}: is {_kind(mode)}, not a regular file; outputs only create files or replace "
                           "regular ones: give a file path")
    return target


def output_file(path, example=None, inputs=()):
    """`path` checked as a file to write before any work is done: not a folder or another non-regular file,
    its folder writable (created if missing), and neither one of `inputs` nor inside an input folder (a
    converted model written into the Hugging Face folder it came from would replace its weights). `example`
    names a file for the message when `path` is a folder. Returns a Path."""
    path = check_name_length(path)
    if path.is_dir():
        raise TransegError(f"{path}: is a folder; give the file to write, e.g. {path / (example or 'output')}")
    replaceable(path)
    where = path.resolve()
    for f in map(Path, inputs):
        if where == f.resolve() or (f.is_dir() and f.resolve() in where.parents):
            raise TransegError(f"{path}: {'is' if where == f.resolve() else 'lies in'} the input {f}, which writing "
                               f"it could replace; write the output outside the inputs")
    output_folder(path.parent)
    return path


# what a failed write looks like when the writer is not Python's own file I/O: safetensors says
# "I/O error: No space left on device (os error 28)", torch.save "unexpected pos 640 vs 598" or
# "PytorchStreamWriter failed writing file ..." (a full disk, seen for real on a small tmpfs)
_OS_ERROR = re.compile(r"(?:os error|errno)\s*(\d+)", re.IGNORECASE)

_WRITE_FAILURE = re.compile(r"unexpected pos|failed writing|file write failed|i/o error|ioerror", re.IGNORECASE)



def _write_failure(error, folder):
    """Why a checkpoint writer failed, when it failed because of the disk (a short reason), else None."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    text = str(error)
    found = _OS_ERROR.search(text)
    if found:
        return os.strerror(int(found.group(1)))
    try:
        fs = os.statvfs(folder)
        if fs.f_bavail == 0 or fs.f_bfree == 0:
            return os.strerror(28)  # No space left on device
    except OSError:
        pass
    if _WRITE_FAILURE.search(text):
        return text.splitlines()[0][:200] if text else type(error).__name__
    return None


def atomic_write(path, write):
    """Call write(tmp_path), fsync, then rename over `path`: readers see the old file or the new
    one, never half of one. A full disk, a read-only folder or a quota (whatever exception the
    writer turns them into: OSError, SafetensorError, torch.save's RuntimeError) becomes one
    TransegError line, with the previous file intact and no temporary file left. Only a regular file is
    ever replaced (`replaceable`): a link keeps pointing at the new file; a FIFO or device is left alone."""
    path = replaceable(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:TMP_STEM]}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        plain_permissions(tmp)  # mkstemp makes it 0600; the file gets what a plain open() would give it
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except TransegError:  # the writer's own one-line error (e.g. export's numerical check)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    except Exception as e:
        reason = _write_failure(e, path.parent)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if reason is None:
            raise
        kept = "the previous version is intact" if path.exists() else "nothing was written"
        raise TransegError(f"{path}: could not be saved ({reason}); {kept}") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass

