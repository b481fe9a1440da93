"""`python -m fxquant`: the command line (see `fxquant.cli`)."""

from fxquant.cli import main

raise SystemExit(main())
