"""`python -m ksmtrace` is the `ksmtrace` command."""

from ksmtrace.cli import main

raise SystemExit(main())
