"""`python -m stepstream_web ARGS` is `stepstream web ARGS` (how `stepstream up` starts the gateway)."""

import sys

from stepstream_client.cli import main

if __name__ == "__main__":
    main(["web", *sys.argv[1:]])
