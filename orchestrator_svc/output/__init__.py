"""Step output: every line a step prints, per attempt, kept apart from the event log.

Interface (what the API serves from): OutputStore.attempts / latest_attempt /
read / wait, with the records OutputKey, OutputLine, AttemptOutput and the
errors OutputNotFound (a KeyError) and OutputGone. Inside the orchestrator an
attempt writes through an OutputSink (OutputStore.sink), opened before its
worker runs and closed with its final state (engine/attempts.py).

Layout. Under `<data dir>/output/<job id>/`, each attempt that printed
anything has three files named `<step>.<child index or ->.<attempt>`:
  .out  records, appended: a header (stream, continued, time, length, line
        count) and then the bytes of whole lines as printed, newlines
        included (every line of one pipe read in one record), or one chunk
        of a line longer than chunk_bytes;
  .idx  per record, its first line number and its offset in .out (16 bytes),
        so reading from line N is a binary search of the index, never a scan;
  .end  written once the attempt ended: its final state, bytes and dropped bytes.
One directory per job, so retention removes a job with one rmtree.

Durability. Output is queued on the loop as it is read, then split, masked,
framed, numbered and written (data before index) in the store's own two
threads, never through the event log's SQLite connection; wait() wakes
readers and read() serves lines only once they are written, so whatever was
served is in the files, and a kill -9 of the orchestrator loses nothing
already served. (The files are not fsynced: an OS crash can lose their last
seconds, which the event log, fsynced, does not.) On start, an attempt with
no .end file is cut after its last whole record, given an "output ends
here" NOTICE line and finished FAILED, as recovery ends its step.

Bounds. Per attempt at most OutputSettings.limit_bytes are kept (records
and index, RECORD_OVERHEAD bytes a record): the first ones; past the limit
lines are read and dropped (pipes keep draining), counted in dropped_bytes
and reported by a final NOTICE line "… N bytes dropped …". A line longer than
chunk_bytes is stored as several records (continued=True on all but the
last), so no line is ever held whole. A sink holds at most one pipe read
(or max_pending_bytes for print() in an async function) unwritten. And the
whole store captures at most rate_bytes per second from commands' pipes
(Pace): capturing costs this process CPU that the event log needs too, so
past the budget the loudest commands wait on their full pipes instead.

Retention. A job's output goes once the job is not running and its last write
is older than retention_seconds (checked every prune interval); a running
job's never. Reading it afterwards is OutputNotFound.

Attempts that printed nothing leave no files: they are listed while they run
and, once finished, until a restart or retention.
"""

from orchestrator_svc.output.capture import STEP_LOGGER, capturing
from orchestrator_svc.output.records import (
    AttemptOutput,
    OutputGone,
    OutputKey,
    OutputLine,
    OutputNotFound,
    OutputStream,
)
from orchestrator_svc.output.store import OutputSettings, OutputSink, OutputStore

__all__ = [
    "STEP_LOGGER",
    "AttemptOutput",
    "OutputGone",
    "OutputKey",
    "OutputLine",
    "OutputNotFound",
    "OutputSettings",
    "OutputSink",
    "OutputStore",
    "OutputStream",
    "capturing",
]
