"""What jcnn's command lines (``jcnn-train``, ``jcnn-eval``, ``jcnn-data``, ``jcnn-build-native``)
share."""

import argparse
import contextlib
import os
import sys


class OneLineParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose command-line mistakes print one line and exit with status 2:
    ``PROG: error: MESSAGE (PROG --help lists the flags)``, without argparse's usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the flags)\n")


@contextlib.contextmanager
def quiet_when_the_reader_leaves():
    """A reader that stops early (``jcnn-eval FOLDER | head -1``) ends the command quietly with
    status 141 (128 + SIGPIPE, what a shell reports for a command the signal ended), not with
    Python's ``BrokenPipeError`` traceback; the output still buffered is flushed inside, where
    the error can be caught."""
    try:
        try:
            yield
        finally:  # also after --help's SystemExit
            sys.stdout.flush()
    except BrokenPipeError:
        # the interpreter flushes stdout again at exit: point it at nothing first
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(141) from None
