"""Files on disk: durable atomic writes (the one way nl_rewrite replaces a file) and the append-only JSONL
:class:`RecordStore` of per-latent records.

The content goes to a uniquely named temporary file in the target's folder (``.<name>.<pid>.<random>.tmp``, with
the permissions the umask gives a new file), which is flushed and fsynced, renamed over the target, and then the
folder is fsynced so the rename itself survives a power loss. A crash, a kill or a full disk therefore leaves
either the old file or the new one, never a partial one. On any error the temporary file is removed; one left by
a killed process (its pid no longer running) is removed by the first write into its folder of each later
process. Tensors are serialised to bytes first and written with Python's I/O, so a full disk (ENOSPC, EDQUOT) is
always an ``OSError`` with its errno, which becomes a ``DiskFullError`` naming the file and what to do.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Generic, Protocol, Sequence, TypeVar, runtime_checkable

from torch import Tensor

from nl_rewrite.errors import NLRewriteError

log = logging.getLogger(__name__)


class DiskFullError(NLRewriteError, OSError):
    """No space left while writing; the previous version of the file is untouched."""


def replace_file(path: Path | str, fill: Callable[[Path], None], sync: bool = True) -> None:
    """Write ``path`` by calling ``fill(temporary_path)``, then make it durable and rename it into place.

    ``sync=False`` skips the two fsyncs: the rename is still atomic, so a killed process leaves the old file or
    the new one, but a power loss may leave a truncated file. Only for recomputable caches written thousands of
    times a run, whose readers treat a corrupt file as missing (the simulation store)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(name)
    try:
        fill(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results and caches are meant to be shared
        if sync:
            _fsync_file(tmp)
        os.replace(tmp, path)
        if sync:
            _fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(errno.ENOSPC, f"no space left on the disk of {path.parent} while writing "
                                f"{path.name}; the previous version is untouched: free space and rerun "
                                "(finished stages are kept)") from exc
        raise


def write_text(path: Path | str, text: str) -> None:
    replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path | str, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=1, default=str))


def read_json_object(path: Path, error: type[Exception], what: str, fix: str) -> dict:
    """The JSON object in ``path``, or ``error`` saying that ``what`` is missing, corrupt or not an object, and
    ``fix``."""
    if not path.is_file():
        raise error(f"{what} not found: {path}; {fix}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{what} {path} is not valid JSON ({exc}); is the file corrupt? {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} must hold a JSON object, got {type(data).__name__}; {fix}")
    return data


T = TypeVar("T")


def read_cached(path: Path, decode: Callable[[Path], T | None], what: str) -> T | None:
    """``decode(path)`` for a recomputable cached result, or None when there is none to reuse (``decode`` may
    also say so by returning None).

    A file that cannot be decoded (not parseable, empty, truncated, missing fields, wrong types, an older layout)
    is logged once, naming it, and reported as absent: the caller recomputes it and the write replaces it. Only for
    files nl_rewrite can recompute; a user's input file must raise an error naming it instead."""
    if not path.exists():  # a file, or a folder such as a checkpoint
        return None
    try:
        return decode(path)
    except Exception as exc:  # any decoding failure means the same thing here: the cache cannot be used
        log.warning("%s %s cannot be read (%s: %s); recomputing it", what, path, type(exc).__name__,
                    str(exc)[:500])
        return None


def read_json(path: Path) -> object:
    """The JSON in ``path`` (strict UTF-8)."""
    return json.loads(path.read_text(encoding="utf-8"))


def write_bytes(path: Path | str, data: bytes, sync: bool = True) -> None:
    replace_file(path, lambda tmp: tmp.write_bytes(data), sync)


def save_tensors(path: Path | str, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None,
                 sync: bool = True) -> None:
    """A safetensors file (tensors made contiguous and detached, as safetensors requires, and moved to the CPU: a file
    written on a GPU loads anywhere)."""
    from safetensors.torch import save

    write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata), sync)


def torch_save(path: Path | str, obj: object) -> None:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    """Best effort: some systems (Windows, some network filesystems) cannot fsync a folder; the file is in place."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_orphans(path: Path) -> None:
    """Temporary files left in ``path``'s folder by processes that no longer run (a kill -9 mid-write)."""
    _clean_folder_once(str(path.parent.resolve()))


@functools.lru_cache(maxsize=None)
def _clean_folder_once(folder: str) -> None:
    # Once per folder and process: a folder can hold thousands of files written thousands of times a run, and a
    # temporary left by a process that died is an orphan forever after, so one sweep per process finds them all.
    for entry in os.scandir(folder):
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            pid = entry.name[:-4].rsplit(".", 2)[-2] if entry.name.count(".") >= 4 else ""
            if pid.isdigit() and not _running(int(pid)):
                Path(entry.path).unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True


@runtime_checkable
class Record(Protocol):
    """What a :class:`RecordStore` keeps: one per latent, tagged with the settings that made it."""

    latent: int
    settings: str

    def to_dict(self) -> dict: ...


R = TypeVar("R", bound=Record)


class RecordStore(Generic[R]):
    """Append-only JSONL of per-latent records made with one settings key; tolerates a half-written last line.

    Records need ``latent`` and ``settings`` attributes and ``to_dict``; ``decode`` turns a dict back into one.
    """

    def __init__(self, path: "str | Path", settings: str, decode: Callable[[dict], R]):
        self.path = Path(path)
        self.settings = settings
        self.decode = decode
        self.records: dict[int, R] = {}
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        lines = self.path.read_bytes().split(b"\n")
        complete = lines[:-1]  # the piece after the last newline is empty, or what a kill left half-written
        kept, unreadable = [], 0
        for line in filter(None, complete):
            try:
                text = line.decode("utf-8")
                record = self.decode(json.loads(text))
            except Exception:  # a damaged line: its latent is simply not done yet
                unreadable += 1
                continue
            if record.settings != self.settings:
                raise NLRewriteError(f"{self.path} holds records made with other settings "
                                     f"({record.settings} ≠ {self.settings}); use another output file")
            self.records[record.latent] = record
            kept.append(text + "\n")
        if lines[-1]:
            log.warning("%s: dropping a half-written last line (an interrupted run)", self.path)
        if unreadable:
            log.warning("%s: dropping %d unreadable record(s); their latents will be done again", self.path, unreadable)
        if lines[-1] or unreadable:
            write_text(self.path, "".join(kept))

    def add(self, records: Sequence[R]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            for record in records:
                fh.write(json.dumps(record.to_dict()) + "\n")
                self.records[record.latent] = record
            fh.flush()
            os.fsync(fh.fileno())
