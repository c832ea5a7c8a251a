"""`stepstream up` and `stepstream demo`, plugged into the client's CLI through
the `stepstream.cli` entry point group (see stepstream_client.cli.LocalCommand).
`up` also serves the web page (stepstream_web) and prints its address; `demo --web`
does for the demo job, and keeps the page up after the job ends until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
from pathlib import Path

from stepstream.flags import env_option, host_port
from stepstream_client import Client
from stepstream_client.cli import EXIT_FAILED, EXIT_OK, exit_code_of, fail
from stepstream_client.render import printable, show_views

from stepstream_common.config import default_data_dir
from stepstream_common.local.demo import demo_definition
from stepstream_common.local.launcher import LocalServices, ServiceStartError
from stepstream_web.config import DEFAULT_LISTEN


class Up:
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data-dir", type=Path, default=None,
                            help="where both keep their data (default: $XDG_DATA_HOME/stepstream or "
                                 "~/.local/share/stepstream)")
        env_option(parser, "--web-listen", "STEPSTREAM_WEB_LISTEN", default=DEFAULT_LISTEN, type=host_port,
                   help="where the web page is served (`stepstream web --listen`)")

    @staticmethod
    async def run(args: argparse.Namespace) -> int:
        data_dir: Path = args.data_dir or default_data_dir("orchestrator").parent
        stop = _stop_on_signals()
        try:
            async with LocalServices(data_dir, args.orchestrator, args.status, web_listen=args.web_listen) as services:
                print(f"orchestrator listening on {services.orchestrator}", flush=True)
                print(f"status service listening on {services.status}", flush=True)
                print(f"web page on {services.web_url}", flush=True)
                print(f"data in {data_dir}; Ctrl-C stops them", flush=True)
                stopping = asyncio.create_task(stop.wait())
                exited = asyncio.create_task(services.wait_any_exit())
                await asyncio.wait({stopping, exited}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if exited.done():
                    service = exited.result()
                    return fail(services.exit_notice(service), EXIT_FAILED)  # the other stops on leaving the block
                exited.cancel()
                codes = await services.stop()
        except ServiceStartError as error:
            return fail(str(error), EXIT_FAILED)
        print("stopped", flush=True)
        return EXIT_OK if all(code == 0 for code in codes) else EXIT_FAILED


class Demo:
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--web", action="store_true",
                            help="also serve the web page of the demo job, and keep it up until Ctrl-C")

    @staticmethod
    async def run(args: argparse.Namespace) -> int:
        with tempfile.TemporaryDirectory(prefix="stepstream-demo-") as temp:
            work = Path(temp)
            with (work / "services.log").open("w") as log:
                try:
                    async with LocalServices(work, "127.0.0.1:0", "127.0.0.1:0", log=log, log_level="warning",
                                             web_listen="127.0.0.1:0" if args.web else None) as services:
                        print(f"demo: orchestrator {services.orchestrator}, status {services.status}, "
                              f"data in {work}", flush=True)
                        async with Client(services.orchestrator, services.status) as client:
                            job = await client.submit(demo_definition(work))
                            print(f"demo: submitted job {printable(job.id)}", flush=True)
                            if args.web:
                                print(f"demo: live page {services.web_url}jobs/{job.id}", flush=True)
                            async with client.watch(job.id) as views:
                                final = await show_views(views, "text", sys.stdout)
                        if args.web:
                            print(f"demo: job {final.state if final else 'unknown'}; the page stays up at "
                                  f"{services.web_url}jobs/{job.id} until Ctrl-C", flush=True)
                            await _stop_on_signals().wait()
                except ServiceStartError as error:
                    return fail(str(error), EXIT_FAILED)
            print(f"demo: job {final.state if final else 'unknown'}; services stopped", flush=True)
        return exit_code_of(final)


def _stop_on_signals() -> asyncio.Event:
    """An event set by Ctrl-C or SIGTERM: a clean stop instead of KeyboardInterrupt."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop
