"""Write checkpoints so that a crash, a full disk or Ctrl-C never leaves a half-written one.

Everything is written into a temporary directory beside the target (same file system), then moved
into place with ``os.replace``/``os.rename``, which are atomic. Until that moment the previous
checkpoint, if any, is untouched; a failure removes the temporary directory and says so.

* :func:`save_pretrained` (and the CLI's ``--output``) replaces the whole target directory: files
  of an older checkpoint (a stale ``model.safetensors.index.json``, old shards) disappear with it.
* :func:`piecewise_quant.save_quantized` moves its two files in one by one, the weights first and
  the config last; the directory may hold other files, which stay. A crash between the two moves
  leaves new weights beside the old config, and the plan hash in the weights' metadata makes every
  loader refuse that pair.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

__all__ = ["check_output_dir", "atomic_directory", "save_pretrained", "replace_files"]


def check_output_dir(target: str | Path, overwrite: bool, what: str = "output directory") -> Path:
    """Raise ``ValueError`` before any work if ``target`` cannot receive a checkpoint: it is a file,
    it lies under a file, its parent is not writable, or it is a non-empty directory and
    ``overwrite`` is false."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{what} {target}: exists and is not a directory")
    parent = target.absolute().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{what} {target}: {probe} is a file, so no directory can be created under it")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {target}: {probe} is not writable by this user (permission denied)")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise ValueError(f"{what} {target}: exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    return target


def _full_disk(exc: BaseException, target: Path) -> BaseException:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OSError(exc.errno, f"no space left on the device while writing {target} ({exc}); nothing was "
                                  f"replaced: the previous contents of {target}, if any, are unchanged. Free space and retry")
    return exc


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block ends without an exception it becomes
    ``target`` (replacing an old one entirely when ``overwrite``). On an exception it is deleted
    and ``target`` is left as it was."""
    target = check_output_dir(target, overwrite)
    parent = target.absolute().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        new = _full_disk(exc, target)
        if new is exc:
            raise
        raise new from None
    if target.exists():
        old = parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


def replace_files(tmp: Path, target: Path, last: tuple[str, ...] = ()) -> None:
    """Move every file of ``tmp`` into ``target`` (``os.replace``: each move atomic), the names in
    ``last`` at the end, then remove ``tmp``."""
    target.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n not in last] + [n for n in last if n in names]:
        os.replace(tmp / name, target / name)
    shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained(model: Any, directory: str | Path, tokenizer: Any = None, overwrite: bool = False, **kwargs: Any) -> Path:
    """``model.save_pretrained(directory, **kwargs)`` (and ``tokenizer.save_pretrained``), atomically:
    written to a temporary directory, then renamed into place. With ``overwrite`` an existing
    checkpoint is replaced as a whole (no stale shard or index file survives); a failure, a full
    disk or Ctrl-C leaves it unchanged. Returns ``directory`` as a ``Path``."""
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(directory)
