"""Entry script of the single-file binary: exactly the `barosync` console script."""

import sys

from barosync.cli import main

if __name__ == "__main__":
    sys.exit(main())
