"""The `ksmtrace` command: argument parsing, dispatch, and turning known
errors into one-line messages with distinct exit codes (never a traceback).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from ksmtrace import __version__, argtypes, signals
from ksmtrace.errors import Exit, KsmtraceError
from ksmtrace.signals import Terminated

DESCRIPTION = """\
ksmtrace: see what Linux Kernel Samepage Merging (KSM) does, stage by stage:
searching (ksmd scanning), merging, counting (who saves what), updating
(copy-on-write breaks and unmerges)."""

EPILOG = """\
examples:
  sudo ksmtrace top --demo             the live view, on a demo workload
  sudo ksmtrace doctor                 what this kernel can show, and how
  sudo ksmtrace stat --demo 1 10       ten 1 s lines while a demo workload merges
  ksmtrace stat --sysfs-only 5         KSM counters every 5 s, no root needed
  sudo ksmtrace trace --stage merging     one line per merge, with its process
  sudo ksmtrace record -o ksm.rec 0.5     record; then `ksmtrace report ksm.rec`
  sudo ksmtrace share                  which VMs and containers share KSM pages
  sudo ksmtrace workload -n 4 -p 2000 -d 50 --cow-fraction 0.1

Run `ksmtrace COMMAND --help` for each command's options and examples."""


# name -> (module, its function adding the command's parser), in --help's order;
# report's adds record, report and timeline
COMMANDS = {
    "doctor": ("ksmtrace.doctor", "add_parser"),
    "top": ("ksmtrace.top", "add_parser"),
    "stat": ("ksmtrace.stat", "add_parser"),
    "trace": ("ksmtrace.trace", "add_parser"),
    "record": ("ksmtrace.report", "add_parser"),
    "report": ("ksmtrace.report", "add_parser"),
    "timeline": ("ksmtrace.report", "add_parser"),
    "share": ("ksmtrace.share", "add_parser"),
    "export": ("ksmtrace.export", "add_parser"),
    "workload": ("ksmtrace.workload", "add_cli"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; when `command` names one, with only that command's
    module imported (a start-up cost of every run), else with all."""
    import importlib

    p = argtypes.Parser(
        prog="ksmtrace",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"ksmtrace {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    adders = [COMMANDS[command]] if command in COMMANDS else COMMANDS.values()
    for module, add in dict.fromkeys(adders):
        getattr(importlib.import_module(module), add)(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return int(Exit.USAGE)
    # Ctrl-C and SIGTERM unwind the with-blocks (probes detached, knobs
    # restored, recordings closed), even when started from a script that
    # ignores SIGINT for background jobs.
    signals.install()
    try:
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a full disk is reported here, not at exit
        return rc
    except KsmtraceError as e:
        return e.report()
    except KeyboardInterrupt:
        print("ksmtrace: interrupted", file=sys.stderr)
        return int(Exit.INTERRUPTED)
    except Terminated as e:
        print("ksmtrace: terminated", file=sys.stderr)
        return int(e.code)
    except BrokenPipeError:
        # `ksmtrace stat | head`: the reader went away; that is not an error.
        sys.stderr.close()
        return int(Exit.OK)
    except OSError as e:
        if e.errno not in _OUTPUT_FULL:
            raise
        # what is still buffered for stdout must not fail again at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return KsmtraceError(f"cannot write the output: {e.strerror}",
                             "free space on its file system, or write it elsewhere").report()


_OUTPUT_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO)


if __name__ == "__main__":
    raise SystemExit(main())
