"""`stepstream`: run the services locally, submit jobs, and watch them live.

Exit codes (watch and submit --watch follow the job's final state):
  0 completed (or the command succeeded)   1 failed (or a service would not start)   3 cancelled
  2 usage   4 cannot reach a service   5 no such job or step
  6 invalid definition or argument   7 refused by the service (e.g. cancelling
  a finished job) or another service error   8 not authenticated: no token, or
  one the service does not accept   9 permission denied: the token's role may
  not do that   130 interrupted (Ctrl-C)
  141 stdout closed early (e.g. `stepstream list | head -1`), as for any tool a pipe left behind
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol, TypeVar

from stepstream.channel import DEFAULT_ORCHESTRATOR, DEFAULT_STATUS, add_tls_arguments, tls_from_arguments
from stepstream.common.v1 import states_pb2
from stepstream.flags import env_option, host_port, positive_float, positive_int
from stepstream.states import CHILD_STATES, job_state_word, step_state_word
from stepstream.tracing import client_interceptors_from_env

from stepstream_client._policy import RetryPolicy
from stepstream_client.errors import (
    DefinitionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    StepstreamError,
    UnauthenticatedError,
    UnavailableError,
    Violation,
)
from stepstream_client.models import JobView, LogLine
from stepstream_client.render import (
    LogPrinter,
    LogTails,
    child_json,
    child_line,
    dumps,
    header_line,
    iso,
    log_json,
    printable,
    show_table,
    show_view,
    show_views,
    submitted_json,
    summary_json,
)
from stepstream_client.sdk import MAX_INT32, Client, read_token

T = TypeVar("T")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_CANCELLED = 3
EXIT_UNREACHABLE = 4
EXIT_NOT_FOUND = 5
EXIT_INVALID = 6
EXIT_REFUSED = 7
EXIT_UNAUTHENTICATED = 8
EXIT_PERMISSION_DENIED = 9
EXIT_INTERRUPTED = 130
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE

# The token itself, for scripts: env only (see _token).
TOKEN_ENV = "STEPSTREAM_TOKEN"

EXIT_BY_JOB_STATE = {"completed": EXIT_OK, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}
# `watch --logs`: how many of each running step's last lines are shown under the tree.
LOG_TAIL_LINES = 5

Handler = Callable[[argparse.Namespace], Awaitable[int]]

# Commands that run the services on this machine: the services' distribution
# provides them (stepstream_common.local), the thin client knows only their names.
LOCAL_COMMAND_GROUP = "stepstream.cli"
LOCAL_COMMANDS = {
    "up": "start both services locally (on --orchestrator and --status) until Ctrl-C",
    "demo": "start throwaway services, run a demo job live, and stop them",
    "web": "serve a live web page of the jobs the status service (--status) knows, until Ctrl-C",
}


class LocalCommand(Protocol):
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None: ...

    @staticmethod
    async def run(args: argparse.Namespace) -> int: ...


def local_command(name: str) -> LocalCommand | None:
    """The installed implementation of `stepstream NAME`, if the services are installed."""
    for point in entry_points(group=LOCAL_COMMAND_GROUP, name=name):
        command: LocalCommand = point.load()
        return command
    return None


def _not_installed(name: str) -> Handler:
    async def explain(args: argparse.Namespace) -> int:
        return fail(f"`stepstream {name}` runs the services, which are not installed here: install the "
                    "stepstream-server distribution (from a clone of the repository: pip install .)", EXIT_USAGE)
    return explain

JOB_STATE_WORDS = [job_state_word(v) for v in states_pb2.JobState.values() if v != states_pb2.JOB_STATE_UNSPECIFIED]
# The states the status service accepts when filtering children (never waiting or skipped).
CHILD_STATE_WORDS = [step_state_word(v) for v in sorted(CHILD_STATES)]


def main(argv: list[str] | None = None) -> None:
    """The console script: exits with the command's code, never with a traceback for Ctrl-C
    or a closed stdout."""
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse ignores a closed stdout itself
    args.client_tls = tls_from_arguments(parser, args)  # its files read now: a bad one is a usage error
    args.token = _token(parser, args)  # so is the token file
    try:
        try:
            code = asyncio.run(_run(args))
        except KeyboardInterrupt:
            code = EXIT_INTERRUPTED
        sys.stdout.flush()  # now, so that a closed stdout is noticed here rather than at exit
    except BrokenPipeError:
        code = _stdout_closed()
    sys.exit(code)


def _token(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The token to present: --token-file's (env STEPSTREAM_TOKEN_FILE), else env
    STEPSTREAM_TOKEN, else none. No --token flag: a command line is visible to every
    user of the machine (ps) and kept in shell histories."""
    token_file = args.token_file or None  # set but empty: unset
    try:
        return read_token(None if token_file else os.environ.get(TOKEN_ENV) or None, token_file)
    except ValueError as error:
        parser.error(str(error))


def _stdout_closed() -> int:
    """The reader of stdout went away (`stepstream list | head -1`): end quietly.

    stdout now points at /dev/null, so the interpreter's final flush cannot fail
    ("Exception ignored ... BrokenPipeError"). The exit code is 141 (128 + SIGPIPE),
    what a shell shows for any tool whose pipe closed under it (`yes | head -1`),
    rather than 0: the output was cut short, and a watch cut short never saw the
    job's final state. Under `set -o pipefail` this fails the pipeline, as `yes` does.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return EXIT_STDOUT_CLOSED


async def _run(args: argparse.Namespace) -> int:
    """Run the command; every error a user can act on becomes one clear message and an exit code."""
    handler: Handler = args.handler
    try:
        return await handler(args)
    except UnavailableError as error:
        return fail(f"{error.message}; is it running? (`stepstream up` starts both services)", EXIT_UNREACHABLE)
    except NotFoundError as error:
        return fail(error.message, EXIT_NOT_FOUND)
    except (DefinitionError, InvalidArgumentError) as error:
        return fail(error.message, EXIT_INVALID, error.violations)
    except UnauthenticatedError as error:
        hint = "give" if error.reason == "TOKEN_MISSING" else "check"
        return fail(f"{error.message}; {hint} the token (--token-file FILE, or env {TOKEN_ENV})", EXIT_UNAUTHENTICATED)
    except PermissionDeniedError as error:
        return fail(error.message, EXIT_PERMISSION_DENIED)
    except StepstreamError as error:
        return fail(error.message, EXIT_REFUSED, error.violations)


def fail(message: str, code: int, violations: list[Violation] | None = None) -> int:
    """The error on stderr, one line (plus one per bad field), control characters escaped:
    messages quote what a user or the server wrote."""
    lines = [f"stepstream: {printable(message)}"] + [
        f"  {printable(readable_field(violation.field))}: {printable(violation.description)}"
        for violation in violations or []
    ]
    # One write, newline included: unbuffered (PYTHONUNBUFFERED), print() writes the text and its newline
    # apart, and `up`'s children, writing to the same stderr, could land a line between them.
    sys.stderr.write("".join(line + "\n" for line in lines))
    return code


def readable_field(path: str) -> str:
    """`definition.steps[1].params.command` -> `steps[1].command`: the path as written in the file,
    where a worker's fields sit next to the step's own."""
    return path.removeprefix("definition.").replace(".params.", ".").removeprefix("params.")


def exit_code_of(view: JobView | None) -> int:
    """The job's final state as an exit code (EXIT_FAILED if the watch ended without one)."""
    return EXIT_BY_JOB_STATE.get(view.state, EXIT_FAILED) if view is not None else EXIT_FAILED


# --- commands -------------------------------------------------------------------

# Someone is waiting at a terminal: retry an idempotent call for 5 s by default (long enough
# to ride over a quick service restart), not the SDK's 20 s, before exit 4 says the service is down.
CLI_RETRY_SECONDS = "5"


def _client(args: argparse.Namespace) -> Client:
    """The SDK client of a command; its calls traced when OTEL_* ask for it (stepstream.tracing)."""
    return Client(args.orchestrator, args.status, retry=RetryPolicy(deadline=args.retry_for), tls=args.client_tls,
                  token=args.token or None, interceptors=client_interceptors_from_env("stepstream-cli"))


async def cmd_submit(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        job = await client.submit(Path(args.file), request_id=args.request_id)
        if args.output == "json":
            print(dumps(submitted_json(job)), flush=True)
        else:
            print(f"submitted job {printable(job.id)} ({printable(job.name)})", flush=True)
        if not args.watch:
            return EXIT_OK
        return await _follow(client, job.id, args.output)


async def cmd_watch(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        return await _follow(client, args.job, args.output, logs=args.logs)


async def _follow(client: Client, job_id: str, output: str, *, logs: bool = False) -> int:
    """Watch the job to its end; with `logs`, the last lines of its running steps too
    (under the tree on a terminal, else as `step › line` lines or {"log": ...} objects)."""
    tails = None
    if logs:
        live = output == "text" and sys.stdout.isatty()

        printer = LogPrinter(sys.stdout, output, prefixed=True, color=False)

        def on_line(line: LogLine) -> None:
            if output == "json":
                print(dumps({"log": log_json(line)}), flush=True)
            elif not live:
                printer.show(line)
                sys.stdout.flush()

        tails = LogTails(lambda step: client.logs(job_id, step, tail=LOG_TAIL_LINES), LOG_TAIL_LINES, on_line)
    try:
        async with client.watch(job_id) as views:
            return exit_code_of(await show_views(views, output, sys.stdout, tails))
    finally:
        if tails is not None:
            await tails.close()


async def cmd_get(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        show_view(await client.get(args.job), args.output, sys.stdout)
    return EXIT_OK


async def cmd_list(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        jobs = await _first(client.list(states=args.state, name=args.name, page_size=min(args.limit, 1000)),
                            args.limit)
    if args.output == "json":
        print(dumps([summary_json(job) for job in jobs]))
    elif sys.stdout.isatty():
        show_table(
            ({"id": job.id, "name": job.name, "state": job.state,
              "steps": f"{job.step_counts.completed}/{job.step_counts.total}",
              "created": iso(job.created_at), "message": job.message} for job in jobs),
            ["id", "name", "state", "steps", "created", "message"], sys.stdout,
        )
    else:
        for job in jobs:
            print(header_line(job))
    return EXIT_OK


async def cmd_children(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        children = await _first(client.children(args.job, args.step, states=args.state,
                                                page_size=min(args.limit or 1000, 1000)), args.limit)
    if args.output == "json":
        print(dumps([child_json(child) for child in children]))
    elif sys.stdout.isatty():
        columns = ["index", "item", "state", "attempt", "duration_seconds", "reason", "message"]
        show_table((child_json(child) for child in children), columns, sys.stdout)
    else:
        for child in children:
            print(child_line(child))
    return EXIT_OK


async def _first(items: AsyncIterator[T], limit: int | None) -> list[T]:
    """Up to `limit` items (all of them when `limit` is None), fetching no page beyond."""
    taken: list[T] = []
    async for item in items:
        taken.append(item)
        if limit is not None and len(taken) >= limit:
            break
    return taken


def unit(text: str) -> tuple[str, int | None]:
    """STEP or STEP/INDEX (a fan-out child): step names never hold a '/'."""
    step, slash, index = text.partition("/")
    if not step or (slash and not (index.isascii() and index.isdigit() and len(index) <= 10
                                   and int(index) <= MAX_INT32)):
        raise argparse.ArgumentTypeError(f"{text!r} is not STEP or STEP/INDEX (INDEX a child's number, 0 first)")
    return step, int(index) if slash else None


def int32_count(text: str) -> int:
    """A positive_int that fits the int32 fields it is sent in."""
    value = positive_int(text)
    if value > MAX_INT32:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_INT32}, got {text}")
    return value


def wants_color(args: argparse.Namespace) -> bool:
    """Colour on a terminal, unless --no-color or NO_COLOR (set, not empty: no-color.org)."""
    return sys.stdout.isatty() and not args.no_color and not os.environ.get("NO_COLOR")


async def cmd_logs(args: argparse.Namespace) -> int:
    step, child = args.unit if args.unit is not None else (None, None)
    if args.attempt is not None and step is None:
        return fail("--attempt needs a STEP", EXIT_USAGE)
    printer = LogPrinter(sys.stdout, args.output, prefixed=step is None, color=wants_color(args))
    async with _client(args) as client:
        lines = client.logs(args.job, step, child, args.attempt, follow=args.follow, tail=args.tail,
                            streams=[args.stream] if args.stream else ())
        async with contextlib.aclosing(lines) as each:
            async for line in each:
                printer.show(line)
                if args.follow:
                    sys.stdout.flush()
    return EXIT_OK


async def cmd_cancel(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        job = await client.cancel(args.job)
    by = f" by {printable(job.cancelled_by)}" if job.cancelled_by else ""
    print(f"cancel requested for job {printable(job.id)} ({printable(job.name)}){by}: it is {job.state}")
    return EXIT_OK


# --- arguments ------------------------------------------------------------------

def _addresses(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--orchestrator/--status, accepted before or after the command. Only the main
    parser sets defaults, so a subcommand does not overwrite an earlier value."""
    if defaults:
        env_option(parser, "--orchestrator", "STEPSTREAM_ORCHESTRATOR", default=DEFAULT_ORCHESTRATOR,
                   type=host_port, help="orchestrator address")
        env_option(parser, "--status", "STEPSTREAM_STATUS", default=DEFAULT_STATUS, type=host_port,
                   help="status service address")
        env_option(parser, "--retry-for", "STEPSTREAM_RETRY_FOR", default=CLI_RETRY_SECONDS, type=positive_float,
                   help="seconds to keep retrying a call that is safe to repeat while a service is unreachable")
        env_option(parser, "--token-file", "STEPSTREAM_TOKEN_FILE", default=None,
                   help=f"file holding the token to present to both services, for services that require one "
                        f"(or the token itself in env {TOKEN_ENV}, which a file overrides)")
        return
    parser.add_argument("--token-file", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--orchestrator", type=host_port, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    parser.add_argument("--status", type=host_port, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", "-o", choices=["text", "json"], default="text",
                        help="text (a live tree on a terminal, key=value lines otherwise) or json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepstream", description="Run jobs made of steps and watch every step live.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _addresses(parser, defaults=True)
    add_tls_arguments(parser)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        _addresses(sub, defaults=False)
        add_tls_arguments(sub, defaults=False)
        sub.set_defaults(handler=handler)
        return sub

    for name, help in LOCAL_COMMANDS.items():
        local = local_command(name)
        if local is None:
            command(name, _not_installed(name), help + " (needs the services installed)")
        else:
            local.add_arguments(command(name, local.run, help))

    submit = command("submit", cmd_submit, "submit a job definition file (.toml, .yaml, .yml, .json)")
    submit.add_argument("file")
    submit.add_argument("--watch", action="store_true", help="then watch it to the end (exit code as `watch`)")
    submit.add_argument("--request-id", default="", help="idempotency key: a repeated submit returns the same job")
    _output(submit)

    watch = command("watch", cmd_watch, "show a job live until it ends; exit code follows its final state")
    watch.add_argument("job")
    watch.add_argument("--logs", action="store_true",
                       help=f"also show what the running steps print (their last {LOG_TAIL_LINES} lines under "
                            "the tree on a terminal)")
    _output(watch)

    get = command("get", cmd_get, "show a job and its steps")
    get.add_argument("job")
    _output(get)

    listing = command("list", cmd_list, "list jobs, newest first")
    listing.add_argument("--state", nargs="+", action="extend", default=[], choices=JOB_STATE_WORDS,
                         help="only jobs in these states")
    listing.add_argument("--name", default="", help="only jobs with exactly this name")
    listing.add_argument("--limit", type=positive_int, default=50, help="at most this many (default 50)")
    _output(listing)

    children = command("children", cmd_children, "list the children of a fan-out step")
    children.add_argument("job")
    children.add_argument("step")
    children.add_argument("--state", nargs="+", action="extend", default=[], choices=CHILD_STATE_WORDS,
                          help="only children in these states")
    children.add_argument("--limit", type=positive_int, default=None, help="at most this many (default all)")
    _output(children)

    cancel = command("cancel", cmd_cancel, "cancel a job")
    cancel.add_argument("job")

    logs = command("logs", cmd_logs, "show what a job's steps printed (stdout and stderr, per attempt)")
    logs.add_argument("job")
    logs.add_argument("unit", metavar="STEP[/INDEX]", nargs="?", type=unit, default=None,
                      help="one step's output, or one child's of a fan-out step; default: every step's in order, "
                           "each line after `step ›`")
    logs.add_argument("-f", "--follow", action="store_true",
                      help="go on showing new lines until the step (every step, without STEP) ends")
    logs.add_argument("--attempt", type=int32_count, default=None,
                      help="that attempt's output (1 the first; default: the latest, and following, each retry's)")
    logs.add_argument("--tail", type=int32_count, default=None, help="only the last N lines of each attempt")
    logs.add_argument("--stream", choices=["stdout", "stderr"], default=None, help="only that stream's lines")
    logs.add_argument("--no-color", action="store_true",
                      help="strip the colours (ANSI sequences) a step printed, as env NO_COLOR does")
    _output(logs)
    return parser


if __name__ == "__main__":
    main()
