"""`stepstream web`, plugged into the client's CLI through the `stepstream.cli`
entry point group: it reads from --status with the CLI's credentials
(--token-file or STEPSTREAM_TOKEN, --tls-*) and serves the page on --listen.

Who may open the page follows the services' own exposure rule
(stepstream_common.exposure): on a loopback address, anyone on this machine;
on any other, only with both HTTPS (--https-cert/--https-key) and an access
token (--access-token-file), or with --insecure, which is logged as a warning
at every start. The token is checked on every request (page, read, stream):
as `Authorization: Bearer TOKEN`, or the HttpOnly cookie that one visit of
/login?token=TOKEN sets before redirecting to a URL without it. No access log
is kept, so no such URL is ever logged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn
from stepstream_client import Client, RetryPolicy
from stepstream_client.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail

from stepstream_common.config import SettingError, add_options, values_of
from stepstream_common.exposure import Protection, assess_exposure
from stepstream_common.tokens import read_token_file
from stepstream_web.app import Gateway
from stepstream_web.config import WebConfig

log = logging.getLogger("stepstream_web")

HTTPS = Protection("HTTPS (--https-cert and --https-key, env STEPSTREAM_WEB_HTTPS_CERT and STEPSTREAM_WEB_HTTPS_KEY)",
                   "over plain HTTP", "pages and the access token cross the network readable")
ACCESS_TOKEN = Protection("an access token (--access-token-file, env STEPSTREAM_WEB_ACCESS_TOKEN_FILE)",
                          "without an access token", "whoever can connect sees every job")
INSECURE = "--insecure (env STEPSTREAM_WEB_INSECURE=1)"
# How long a stop (SIGTERM, Ctrl-C) waits for open page streams before closing them: browsers reconnect.
SHUTDOWN_GRACE = 1


class _Server(uvicorn.Server):
    """uvicorn's server, stopped by SIGINT or SIGTERM as every stepstream process is (the exit code 0
    of a graceful stop), not by uvicorn's own handlers, which re-raise the signal once stopped."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._stop)
        try:
            yield
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    def _stop(self) -> None:
        self.should_exit = True


class _DroppedBrowser(logging.Filter):
    """uvicorn reports a stream the gateway dropped on purpose (a browser that read nothing) as an
    error; the gateway logs it as a warning itself (stepstream_web.app.EventStream)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing response."


def _bound(listen: str) -> socket.socket:
    """The listening socket, bound now so that port 0's choice is known before serving."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, int(port)), family=family, reuse_port=False)


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Web:
    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_options(parser, WebConfig)
        parser.set_defaults(web_parser=parser)

    @staticmethod
    async def run(args: argparse.Namespace) -> int:
        config = WebConfig(**values_of(args.web_parser, WebConfig, vars(args)))
        try:
            access_token = read_token_file(config.access_token_file) if config.access_token_file else ""
        except SettingError as error:
            return fail(f"--access-token-file: {error}", EXIT_USAGE)
        exposure = assess_exposure(config.listen, tls_enabled=config.https_cert is not None,
                                   auth_enabled=bool(access_token), insecure=config.insecure, tls=HTTPS,
                                   tokens=ACCESS_TOKEN, insecure_flag=INSECURE)
        if exposure.refusal:
            return fail(exposure.refusal, EXIT_USAGE)
        if (config.https_cert is None) != (config.https_key is None):
            return fail("--https-cert and --https-key go together", EXIT_USAGE)
        if config.https_cert is not None:
            try:  # now, so that a bad file is one line and exit 2, not a traceback from uvicorn
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(config.https_cert,
                                                                                    config.https_key)
            except (OSError, ssl.SSLError) as error:
                return fail(f"--https-cert/--https-key: {getattr(error, 'strerror', None) or error}", EXIT_USAGE)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("uvicorn.error").addFilter(_DroppedBrowser())
        if exposure.warning:
            log.warning("%s", exposure.warning)
        try:
            sock = _bound(config.listen)
        except OSError as error:
            return fail(f"cannot listen on {config.listen}: {error.strerror or error}", EXIT_FAILED)
        async with Client(args.orchestrator, args.status, retry=RetryPolicy(deadline=args.retry_for),
                          tls=args.client_tls, token=args.token or None, ingest_grace=2.0) as client:
            gateway = Gateway(client, config, access_token)
            options: dict[str, Any] = {}
            if config.https_cert is not None:
                options = {"ssl_certfile": str(config.https_cert), "ssl_keyfile": str(config.https_key)}
            server = _Server(uvicorn.Config(
                gateway.app(), log_level="warning", access_log=False, lifespan="off",
                timeout_graceful_shutdown=SHUTDOWN_GRACE, **options,
            ))
            scheme = "https" if options else "http"
            print(f"web gateway listening on {_address(sock)}", flush=True)
            print(f"open {scheme}://{_address(sock)}/ (reading the status service at {args.status})", flush=True)
            with sock:
                await server.serve(sockets=[sock])
        return EXIT_OK

