"""``python -m stores describe PATH`` / ``python -m stores estimate ...`` (see ``stores/cli.py``)."""

from stores.cli import main

raise SystemExit(main())
