"""``python -m fastckpt``: the command line (see :mod:`fastckpt.cli`)."""

from .cli import main

raise SystemExit(main())
