"""The Prometheus exporter (`ksmtrace export`): metric families built from
the newest Snapshot (`metrics`), a custom collector in its own registry
(`collector`), the HTTP endpoint (`server`) and the command (`command`).

Importing this package does not import prometheus_client; its modules
other than `command` do.
"""

from ksmtrace.export.command import add_parser, run

__all__ = ["add_parser", "run"]
