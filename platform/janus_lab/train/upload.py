"""Putting one rank's checkpoint into the run's storage, through an S3 outage and never half on a full disk.

Ray Train copies a reported checkpoint with pyarrow, once: an S3 blip fails the report, and a
full disk leaves a partly copied folder behind with an error that names neither the folder nor
the size. `checkpoint_uploader` gives `ray.train.report` an upload function that

- checks a local checkpoint path has room for the checkpoint before copying anything,
- retries the whole copy while S3 does not answer (`train.retry`, `janus_lab.retry`),
- on a full disk removes what it copied and raises `CheckpointStorageFull`, naming the path
  and the bytes needed.

A checkpoint counts as complete only once Ray Train has registered the report that carries it
(it resumes from its own record, not from folder names), and a failed upload never reports, so
the last good checkpoint stays the one a restart loads.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from janus_lab.retry import S3RetryConfig
from janus_lab.retry import with_s3_retries


class CheckpointStorageFull(OSError):
    """The checkpoint path has no room for a checkpoint (errno ENOSPC; made by `of`, and plain
    `(errno, message)` args so that it crosses from a Ray worker to the driver intact)."""

    @classmethod
    def of(cls, path: str, needed: int, free: int | None, step: str, during_copy: bool = False):
        room = f"{free} bytes free there" if free is not None else "the device is full"
        when = "ran out of space copying it (removed)" if during_copy else "not copied"
        return cls(errno.ENOSPC, f"no space left on the checkpoint path {path}: {step} needs {needed} bytes, "
                                 f"{room}; {when}. The last complete checkpoint is kept; free space there or "
                                 f"set train.storage_path to a larger volume, then resubmit to resume")


def folder_bytes(folder: str | os.PathLike) -> int:
    """Bytes of every file under `folder`."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC, from the OS or as pyarrow words it ("No space left on device")."""
    return (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "no space left" in str(error).lower()


def free_bytes(path: str) -> int:
    """Free bytes on the local file system holding `path` (or its nearest existing parent)."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def checkpoint_uploader(retry: S3RetryConfig | None = None):
    """An upload function for `ray.train.report(checkpoint_upload_fn=...)` (see the module doc)."""
    import ray.train
    from pyarrow import fs as pafs

    def upload(checkpoint, dir_name: str):
        storage = ray.train.get_context().get_storage()
        target_fs = storage.storage_filesystem
        target = storage.build_checkpoint_path_from_name(dir_name)
        local = isinstance(target_fs, pafs.LocalFileSystem)
        needed = folder_bytes(checkpoint.path)
        world = ray.train.get_context().get_world_size()
        # Every rank copies its own part into the same folder at once: the folder needs them all.
        step = f"{dir_name} (about {needed * world} bytes for its {world} ranks; this rank's part)"
        if local and free_bytes(target) < needed:
            raise CheckpointStorageFull.of(target, needed, free_bytes(target), step)
        where = target if local else f"s3://{target}"
        try:
            return with_s3_retries(lambda: storage.persist_current_checkpoint(checkpoint, dir_name),
                                   "uploading checkpoint", where, retry, setting="retry")
        except OSError as error:
            if not is_disk_full(error):
                raise
            _remove(target_fs, target)
            raise CheckpointStorageFull.of(target, needed, free_bytes(target) if local else None, step,
                                           during_copy=True) from error

    return upload


def _remove(filesystem, path: str) -> None:
    """Best effort: the partial copy goes, so nothing looks like a checkpoint that is not one."""
    try:
        filesystem.delete_dir(path)
    except OSError:
        pass
