"""The WAL's fsync helper: a process of its own that fdatasyncs the WAL when the store asks (see
gateway.storage.sqlite._WalSyncer, which explains why a process and not a thread).

Run as `python -I -S fsync_helper.py WAL DIRECTORY`: it uses nothing beyond the interpreter's built-in
modules, so it starts fast and stays small. On stdin come 8-byte little-endian commit numbers; for each
batch of them read at once, it makes one fdatasync and writes the highest number and one byte to stdout: 0
when the sync succeeded, else the errno of its failure. At the end of its input (the store closed, or its
process died) it exits.
"""

import os
import signal
import struct
import sys

REQUEST = struct.Struct("<Q")
REPLY = struct.Struct("<QB")


def main(wal: str, directory: str) -> None:
    # Only the end of its input ends it: a signal meant for the gateway must not cut its last fsyncs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    fd = -1
    inode = -1
    pending = b""
    while True:
        data = os.read(0, 65536)
        if not data:
            return
        data = pending + data
        whole = len(data) - len(data) % REQUEST.size
        pending = data[whole:]
        target = max((number for (number,) in REQUEST.iter_unpack(data[:whole])), default=0)
        if not target:
            continue
        errno = 0
        try:
            fd, inode = open_wal(wal, directory, fd, inode)
            os.fdatasync(fd)
        except OSError as exc:
            errno = exc.errno or 255
        os.write(1, REPLY.pack(target, min(errno, 255)))


def open_wal(wal: str, directory: str, fd: int, inode: int) -> tuple[int, int]:
    """The descriptor to sync. One for as long as the file lives: the kernel reports a write error to every
    descriptor opened before it, once each, so one opened afresh for each sync could miss an error that
    SQLite's own descriptor (a checkpoint) already saw. A new WAL file (SQLite replaces it only when the
    last connection closes) gets a new descriptor, and its directory entry an fsync."""
    current = os.stat(wal).st_ino
    if fd >= 0 and current == inode:
        return fd, inode
    new = os.open(wal, os.O_RDONLY)
    if fd >= 0:
        os.close(fd)
    handle = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
    return new, current


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
