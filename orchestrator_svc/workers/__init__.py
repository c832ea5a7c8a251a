"""Built-in workers (command, python, sleep, fanout) and the plugin registry."""
