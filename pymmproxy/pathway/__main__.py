"""``python -m pymmproxy.pathway add|del|add-all|del-all|status ...``."""

from pymmproxy.pathway.cli import main

raise SystemExit(main())
