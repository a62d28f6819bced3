"""`python -m ksmtrace.workload`: the CLI, or a child with --child."""

from ksmtrace.workload.cli import main

raise SystemExit(main())
