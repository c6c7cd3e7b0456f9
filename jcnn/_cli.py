"""What jcnn's command lines (``jcnn-train``, ``jcnn-eval``, ``jcnn-data``, ``jcnn-build-native``)
share."""

import argparse


class OneLineParser(argparse.ArgumentParser):
    """An ``argparse`` parser whose command-line mistakes print one line and exit with status 2:
    ``PROG: error: MESSAGE (PROG --help lists the flags)``, without argparse's usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the flags)\n")
