"""Whether the footage index can take writes, and what to call a write that failed (docs/architecture.md, "Index").

A volume that went read-only, lost its permissions or filled up still reads fine, so the root check of SegmentIndex
(the marker file) cannot see it. `check_writable` writes and removes a small probe file in the root (/healthz);
`write_error_text` names the real cause of a failed write ("index not writable: Read-only file system") rather than
whatever the cleanup after it said.
"""
from __future__ import annotations

import errno
import os
import uuid

from pipeline.index_files import TMP_PREFIX, IndexUnavailable

# errno values that mean "this volume takes no writes now", whatever was written
NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}


class IndexNotWritable(OSError):
    """The index root exists but a write into it failed."""


def write_error_text(error: BaseException) -> str:
    """One line naming why an index write failed: the volume's state where the OS says it, else the error."""
    if isinstance(error, IndexUnavailable):
        return f"index unavailable: {error}"
    if isinstance(error, IndexNotWritable):
        return str(error)
    if isinstance(error, OSError) and error.errno in NOT_WRITABLE:
        return f"index not writable: {os.strerror(error.errno)}"
    return f"index write failed: {type(error).__name__}: {error}"


def check_writable(index) -> None:
    """Write and remove a probe file in the index root; IndexUnavailable when the root is gone, IndexNotWritable
    (naming the cause) when it takes no writes."""
    index.check_root()
    probe = f"{index.root}/{TMP_PREFIX}probe-{uuid.uuid4().hex}"
    try:
        with index.fs.open_output_stream(probe) as out:
            out.write(b"probe\n")
    except OSError as e:
        raise IndexNotWritable(write_error_text(e)) from e
    try:
        index.fs.delete_file(probe)
    except OSError as e:
        raise IndexNotWritable(write_error_text(e)) from e
