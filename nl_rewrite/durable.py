"""Durable, atomic file writes: the one way nl_rewrite replaces a file on disk.

The content goes to a uniquely named temporary file in the target's folder, which is flushed and fsynced, renamed
over the target, and then the folder is fsynced so the rename itself survives a power loss. A crash, a kill or a
full disk therefore leaves either the old file or the new one, never a partial one. On any error the temporary
file is removed. A full disk (ENOSPC) becomes a ``DiskFullError`` that names the file and what to do.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from torch import Tensor

from .errors import NLRewriteError


class DiskFullError(NLRewriteError, OSError):
    """No space left while writing; the previous version of the file is untouched."""


def replace_file(path: Path | str, fill: Callable[[Path], None]) -> None:
    """Write ``path`` by calling ``fill(temporary_path)``, then make it durable and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(name)
    try:
        fill(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise DiskFullError(errno.ENOSPC, f"no space left on the disk of {path.parent} while writing "
                                f"{path.name}; the previous version is untouched: free space and rerun "
                                "(finished stages are kept)") from exc
        raise


def write_text(path: Path | str, text: str) -> None:
    replace_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path | str, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=1, default=str))


def save_tensors(path: Path | str, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file (tensors made contiguous and detached, as safetensors requires)."""
    from safetensors.torch import save_file

    plain = {k: v.detach().contiguous() for k, v in tensors.items()}
    replace_file(path, lambda tmp: save_file(plain, str(tmp), metadata=metadata))


def torch_save(path: Path | str, obj: object) -> None:
    import torch

    replace_file(path, lambda tmp: torch.save(obj, tmp))


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
