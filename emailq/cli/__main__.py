"""``python -m emailq.cli``: the ``emailq`` command, for where the script is not installed."""

from emailq.cli.main import main

raise SystemExit(main())
