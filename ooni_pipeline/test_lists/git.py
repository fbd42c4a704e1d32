"""Shallow clone of a git repository, with a timeout and a readable failure."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from ooni_pipeline.clickhouse.connection import redact_url


class CloneError(RuntimeError):
    pass


def shallow_clone(url: str, into: Path, timeout_s: float) -> str:
    """Clone the default branch of ``url`` at depth 1 into ``into``; return the commit SHA."""
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}
    command = [
        "git",
        "clone",
        "--quiet",
        "--depth",
        "1",
        "--single-branch",
        "--no-tags",
        url,
        str(into),
    ]
    try:
        subprocess.run(
            command, check=True, capture_output=True, text=True, timeout=timeout_s, env=env
        )
        return subprocess.run(
            ["git", "-C", str(into), "rev-parse", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout.strip()
    except subprocess.TimeoutExpired:
        raise CloneError(
            f"git clone of {redact_url(url)} timed out after {timeout_s:.0f} s"
        ) from None
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or "").strip().replace(url, redact_url(url))
        raise CloneError(f"git clone of {redact_url(url)} failed: {detail}") from None
