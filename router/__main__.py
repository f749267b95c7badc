"""`python -m router ...` is the same as the `router` console script."""

from router.cli.main import main

raise SystemExit(main())
