"""
The stream C{access_log}: one line per session, written when the session ends.

Each line is one C{write(2)} on a file opened with C{O_APPEND}, as nginx does without
C{buffer=}.  That is the choice here, not a buffer flushed on a timer, because:

  - several worker processes append to the same file; with C{O_APPEND} a single
    write of a line is placed whole at the end, so lines from different workers
    never interleave; a userspace buffer flushed in chunks could split a line;
  - a line is visible (C{tail -f}, tests, log shippers) as soon as its session ends,
    and none is lost if the process dies;
  - a relay writes one line per connection, not per request: a system call per
    line is small next to the connection's own accept, handshake and close.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from attrs import define, field

from tlsrelay._log import Logger

if TYPE_CHECKING:
    # Only for annotations: the configuration loader imports the formats below
    # without the TLS machinery behind the variables.
    from tlsrelay._variables import Session, Template

BASIC_FORMAT = (
    "$remote_addr [$time_local] $protocol $status $bytes_sent $bytes_received "
    "$session_time"
)
"""
nginx's predefined stream C{log_format basic}.
"""

PREDEFINED_FORMATS: dict[str, str] = {"basic": BASIC_FORMAT}
"""
The C{log_format} names nginx defines in the stream module: every configuration
starts with these, and a C{log_format} may not redefine them.
"""

log = Logger()

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


@define(eq=False)
class AccessLogWriter:
    """
    Appends lines to one access log file.

    L{open} it at start-up (so a path that cannot be opened fails start-up),
    L{reopen} it after log rotation (SIGHUP), L{close} it at shutdown.
    """

    path: str
    mode: int = 0o644
    _fd: int | None = field(default=None, init=False)
    _failing: bool = field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        if self.path.startswith("syslog:"):
            raise ValueError(f'syslog access logs are not supported: "{self.path}"')

    @property
    def isOpen(self) -> bool:
        """
        Whether the file is open.
        """
        return self._fd is not None

    def open(self) -> None:
        """
        Open the file for appending, creating it if needed.

        @raise OSError: if it cannot be opened.
        """
        if self._fd is None:
            self._fd = os.open(self.path, _FLAGS, self.mode)

    def reopen(self) -> None:
        """
        Open the path again (the file was rotated away) and close the old one.

        If the path cannot be opened, keep writing to the old file and log why.
        """
        try:
            fd = os.open(self.path, _FLAGS, self.mode)
        except OSError as e:
            log.error(
                "cannot reopen access log {path}: {error}", path=self.path, error=e
            )
            return
        old, self._fd = self._fd, fd
        self._failing = False
        if old is not None:
            os.close(old)

    def close(self) -> None:
        """
        Close the file; lines written afterwards are dropped.
        """
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def writeLine(self, line: str) -> None:
        """
        Append C{line} and a newline, in one write.

        A write error (disk full, ...) is logged once until a write succeeds again;
        it never breaks the session that is being logged.
        """
        if self._fd is None:
            return
        data = (line + "\n").encode("utf-8", "surrogateescape")
        try:
            written = os.write(self._fd, data)
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError as e:
            if not self._failing:
                self._failing = True
                log.error(
                    "cannot write access log {path}: {error}",
                    path=self.path,
                    error=e,
                )
            return
        self._failing = False

    def write(self, template: Template, session: Session) -> None:
        """
        Render C{template} for C{session} as a log line and append it.
        """
        self.writeLine(template.renderLog(session))


@define(eq=False)
class AccessLogFiles:
    """
    One L{AccessLogWriter} per path, shared by every server that logs there (as
    nginx opens each path once), so that rotation reopens each file once.
    """

    _writers: dict[str, AccessLogWriter] = field(factory=dict, init=False)

    def writerFor(self, path: str) -> AccessLogWriter:
        """
        The writer of C{path}, made (not opened) the first time.
        """
        writer = self._writers.get(path)
        if writer is None:
            writer = self._writers[path] = AccessLogWriter(path)
        return writer

    def open(self) -> None:
        """
        Open every file.

        @raise OSError: for the first that cannot be opened.
        """
        for writer in self._writers.values():
            writer.open()

    def reopen(self) -> None:
        """
        Reopen every file (after rotation).
        """
        for writer in self._writers.values():
            writer.reopen()

    def close(self) -> None:
        """
        Close every file.
        """
        for writer in self._writers.values():
            writer.close()
