"""ksmtrace: an eBPF observatory for Linux Kernel Samepage Merging."""

__version__ = "0.1.0"
