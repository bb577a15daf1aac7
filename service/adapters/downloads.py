"""The download cache of remote adapter packages, safe to share between processes.

Packages fetched from the hub or object storage land in `<cache>/<name>/<version>`. In
Kubernetes that cache is a volume every replica of the chart mounts (`cache.persistence`), so
several processes install, use and prune the same directories. Each version a process uses is
held with a shared `flock` on `<cache>/<name>/.<version>.lock`; a process deletes a version it no
longer needs only if it can take that lock exclusively, that is, when no live process holds it.
The kernel drops a dead process's locks, so a crashed replica leaves nothing held.

- Installing and pruning one name take `<cache>/<name>/.lock` exclusively (both are renames and
  deletions: quick), so a version is never taken while another process deletes it.
- A download runs in `<cache>/.staging-<id>`, held exclusively by its downloader through the
  sibling `.staging-<id>.lock`: a starting process sweeps only the staging directories whose
  downloader is gone, never one a live replica is filling.

flock works on local disks and on NFS v4 (as Linux maps it to byte-range locks); on a file
system without locks every call fails with OSError, which the caller reports.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)
STAGING = ".staging-"


@contextlib.contextmanager
def _locked(path: Path, mode: int) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield fd
    finally:
        os.close(fd)  # closing drops the lock


class DownloadCache:
    def __init__(self, root: Path):
        self.root = root
        self._held: dict[tuple[str, str], int] = {}  # (name, version) -> fd holding LOCK_SH
        self._lock = threading.Lock()

    def sweep(self) -> list[Path]:
        """Delete the staging directories of downloads whose process is gone (at start)."""
        swept = []
        for staging in sorted(self.root.glob(f"{STAGING}*")) if self.root.is_dir() else ():
            if staging.suffix == ".lock":
                if staging.with_suffix("").exists():
                    continue  # its directory's turn
                staging, lock = staging.with_suffix(""), staging  # a lock its downloader left
            else:
                lock = staging.with_name(staging.name + ".lock")
            try:
                with _locked(lock, fcntl.LOCK_EX | fcntl.LOCK_NB):
                    shutil.rmtree(staging, ignore_errors=True)
                    lock.unlink(missing_ok=True)
            except BlockingIOError:
                continue  # a live process is downloading into it
            swept.append(staging)
        return swept

    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """An empty directory to download into, removed on the way out (what `install` took
        from it is gone by then)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / f"{STAGING}{uuid.uuid4().hex}"
        lock = path.with_name(path.name + ".lock")
        with _locked(lock, fcntl.LOCK_EX):  # taken before the directory exists: see `sweep`
            path.mkdir()
            try:
                yield path
            finally:
                shutil.rmtree(path, ignore_errors=True)
                lock.unlink(missing_ok=True)

    def install(self, staging: Path, name: str, version: str) -> Path:
        """Move a validated staging directory to `<name>/<version>` in one rename and hold that
        version. The same version already there (another replica's, or an earlier load's) wins:
        its files are the same content."""
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        destination = folder / version
        with _locked(folder / ".lock", fcntl.LOCK_EX):
            try:
                os.rename(staging, destination)
            except OSError:
                if not destination.is_dir():
                    raise
            self._hold(name, version)
        return destination

    def _hold(self, name: str, version: str) -> None:
        with self._lock:
            if (name, version) in self._held:
                return
            fd = os.open(self.root / name / f".{version}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)  # never waits: an exclusive holder holds the name lock too
            self._held[(name, version)] = fd

    def _release(self, name: str, version: str) -> None:
        with self._lock:
            fd = self._held.pop((name, version), None)
        if fd is not None:
            os.close(fd)

    def held(self, name: str) -> set[str]:
        with self._lock:
            return {v for n, v in self._held if n == name}

    def prune(self, name: str, keep: Iterable[str]) -> list[str]:
        """Stop holding every version of `name` but `keep`, and delete those no other process
        holds. Returns the versions on disk outside `keep`, deleted or not: this process holds
        none of them now."""
        keep = set(keep)
        folder = self.root / name
        if not folder.is_dir():
            return []
        released = []
        with _locked(folder / ".lock", fcntl.LOCK_EX):
            for path in sorted(folder.iterdir()):
                version = path.name
                if version.startswith(".") or version in keep or not path.is_dir():
                    continue
                self._release(name, version)
                released.append(version)
                lock = folder / f".{version}.lock"
                try:
                    with _locked(lock, fcntl.LOCK_EX | fcntl.LOCK_NB):
                        shutil.rmtree(path, ignore_errors=True)
                        lock.unlink(missing_ok=True)
                except BlockingIOError:
                    log.info("adapter %r version %s kept on disk: another process uses it", name, version)
        return released
