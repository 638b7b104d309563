"""``python -m pymmproxy``."""

from pymmproxy.cli import main

raise SystemExit(main())
