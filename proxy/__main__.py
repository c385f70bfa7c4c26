"""``python -m proxy``: the same entry point as the ``pgml-proxy`` console script."""

from proxy.cli import main

raise SystemExit(main())
