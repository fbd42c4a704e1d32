"""Shallow clone of an untrusted git repository, bounded in time and size.

Upstream content is untrusted: the URL is passed after ``--`` (a URL starting with
``-`` is not an option), symlinks are checked out as plain files holding their
target (``core.symlinks=false``) and reported, and the clone is killed, with every
git helper it started, when it runs out of time or grows past its size cap. The
files are checked out only after their total size, read from the tree, fits the
cap, so a small, highly compressed download cannot fill the disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ooni_pipeline.clickhouse.connection import redact_url

SYMLINK_MODE = "120000"
_POLL_S = 0.2
_GIT = ("git", "-c", "core.symlinks=false", "-c", "protocol.ext.allow=never")


class CloneError(RuntimeError):
    pass


@dataclass(frozen=True)
class Clone:
    commit: str
    bytes: int  # the repository as downloaded plus the files checked out
    symlinks: frozenset[str]  # paths git records as symlinks, checked out as plain files


def _disk_bytes(path: Path) -> int:
    """Apparent size of the files under ``path``, links not followed; files that
    vanish while git renames them are skipped."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


class _Git:
    """Runs git commands for one clone against one deadline and one size cap."""

    def __init__(self, url: str, into: Path, timeout_s: float, max_bytes: int):
        self.url, self.into = url, into
        self.timeout_s, self.max_bytes = timeout_s, max_bytes
        self.deadline = time.monotonic() + timeout_s
        self.env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}

    def too_large(self, size: int) -> CloneError:
        return CloneError(
            f"git clone of {redact_url(self.url)}: the repository is larger than "
            f"clone_max_bytes ({size} > {self.max_bytes} bytes, download plus files)"
        )

    def run(self, *args: str, watch: bool = False) -> str:
        """Run ``git args`` in its own process group; return its stdout. With
        ``watch``, the clone directory's size is checked while it runs."""
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            process = subprocess.Popen(
                [*_GIT, *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.env,
                start_new_session=True,
            )
            try:
                while True:
                    try:
                        process.wait(timeout=_POLL_S)
                        break
                    except subprocess.TimeoutExpired:
                        pass
                    if time.monotonic() > self.deadline:
                        raise CloneError(
                            f"git clone of {redact_url(self.url)} timed out after {self.timeout_s:.0f} s"
                        )
                    if watch and (size := _disk_bytes(self.into)) > self.max_bytes:
                        raise self.too_large(size)
            finally:
                if process.returncode is None:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            out.seek(0)
            err.seek(0)
            if process.returncode != 0:
                # git's own message, bounded; the URL is shown without a password.
                detail = err.read()[-2000:].decode("utf-8", "replace").strip()
                detail = detail.replace(self.url, redact_url(self.url))
                raise CloneError(f"git clone of {redact_url(self.url)} failed: {detail}")
            return out.read().decode("utf-8", "replace")


def _tree(listing: str) -> tuple[int, frozenset[str]]:
    """(total blob bytes, symlink paths) of ``git ls-tree -r -l -z`` output."""
    total, symlinks = 0, set()
    for entry in filter(None, listing.split("\0")):
        info, _, path = entry.partition("\t")
        mode, _, _, size = info.split()
        if size.isdigit():
            total += int(size)
        if mode == SYMLINK_MODE:
            symlinks.add(path)
    return total, frozenset(symlinks)


def shallow_clone(url: str, into: Path, timeout_s: float, max_bytes: int) -> Clone:
    """Clone the default branch of ``url`` at depth 1 into ``into``, within
    ``timeout_s`` seconds and ``max_bytes`` bytes on disk."""
    git = _Git(url, into, timeout_s, max_bytes)
    git.run(
        "clone",
        "--quiet",
        "--no-checkout",
        "--depth",
        "1",
        "--single-branch",
        "--no-tags",
        "--config",
        "core.symlinks=false",
        "--",
        url,
        str(into),
        watch=True,
    )
    files, symlinks = _tree(git.run("-C", str(into), "ls-tree", "-r", "-l", "-z", "HEAD"))
    size = _disk_bytes(into) + files
    if size > max_bytes:
        raise git.too_large(size)
    git.run("-C", str(into), "checkout", "--quiet", "--force")
    commit = git.run("-C", str(into), "rev-parse", "HEAD").strip()
    return Clone(commit, size, symlinks)
