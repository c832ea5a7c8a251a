"""Both services on this machine, for `stepstream up` and `stepstream demo`.

The thin client (client/) knows these two commands only by name: this package
registers them under the `stepstream.cli` entry point group, so they exist once
the services are installed, and a client-only install says what to install.
"""
