"""`python -m stepstream_client` is the `stepstream` command."""

from stepstream_client.cli import main

if __name__ == "__main__":
    main()
