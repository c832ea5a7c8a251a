"""What the output store holds, and how a record is framed on disk."""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass


class OutputStream(enum.IntEnum):
    """Where a line came from. NOTICE lines are the service's own (e.g. "… 123,456 bytes dropped …")."""

    STDOUT = 1
    STDERR = 2
    NOTICE = 3


@dataclass(frozen=True)
class OutputKey:
    """One attempt of a step (child None) or of a fan-out child; `attempt` is 1-based, as in StepStats."""

    job_id: str
    step: str
    child: int | None
    attempt: int


@dataclass(frozen=True)
class OutputLine:
    """One record: a whole line, or a chunk of a longer one."""

    # 0-based position within the attempt's output: the resume offset ("after_line"), contiguous.
    number: int
    stream: OutputStream
    # Raw bytes as printed, without the newline; never decoded here.
    data: bytes
    # Unix seconds when it was read from the pipe (or written by the worker).
    time: float
    # True if this record is a chunk of a longer line that goes on in the next record of the same stream.
    continued: bool


@dataclass(frozen=True)
class AttemptOutput:
    """What an attempt's output is, without reading it."""

    key: OutputKey
    # Lines readable now: numbers 0 .. lines-1.
    lines: int
    # Bytes of line data kept (newlines and framing not counted).
    bytes: int
    # Bytes printed past the attempt's limit and not kept.
    dropped_bytes: int
    # The first line still held (lines before it are gone: OutputGone).
    first_retained: int
    finished: bool
    # The attempt's StepState value once finished (CANCELLED when stopped from outside), else 0.
    final_state: int
    # Finished, failed, and another attempt follows it.
    retried: bool = False


class OutputNotFound(KeyError):
    """No output is known for this key: never printed, unknown, or removed by retention."""


class OutputGone(Exception):
    """The requested lines are no longer held; `first_retained` is the first line that is."""

    def __init__(self, key: OutputKey, first_retained: int) -> None:
        super().__init__(f"output of {key} before line {first_retained} is no longer held")
        self.key = key
        self.first_retained = first_retained


# A record: flags (stream in bits 0-1, continued in bit 2), time (float64), length (uint32), lines (uint32),
# then `length` bytes: `lines` whole lines, each with its newline, as printed; or (continued) one chunk
# of a longer line, without one. A fast printer's read becomes one record, not one per line.
HEADER = struct.Struct("<BdII")
# The index: per record, the number of its first line and its offset in the data file.
INDEX_ENTRY = struct.Struct("<QQ")
# What one record costs on disk beyond its data; counted against the per-attempt limit.
RECORD_OVERHEAD = HEADER.size + INDEX_ENTRY.size
CONTINUED = 4


def frame(stream: OutputStream, data: bytes, time: float, lines: int, continued: bool) -> bytes:
    return HEADER.pack(int(stream) | (CONTINUED if continued else 0), time, len(data), lines) + data


def unframe(header: bytes, data: bytes, first: int) -> list[OutputLine]:
    """The lines of the record with this header and data, numbered from `first`."""
    flags, time, _, _ = HEADER.unpack(header)
    stream, continued = OutputStream(flags & 3), bool(flags & CONTINUED)
    if continued:
        return [OutputLine(first, stream, data, time, True)]
    return [OutputLine(first + n, stream, line, time, False) for n, line in enumerate(data.split(b"\n")[:-1])]
