"""``python -m prunekit``: the same as the ``prunekit`` command."""

from prunekit.cli.main import main

raise SystemExit(main())
