"""Command-line interface (``prunekit ...``)."""
