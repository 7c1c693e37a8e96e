"""Pipeline sub-commands (train, finetune, eval, export, demo) of the ``prunekit`` CLI."""

from __future__ import annotations

import argparse


def add_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Register the pipeline sub-commands on the CLI's sub-parser set."""
    return None
