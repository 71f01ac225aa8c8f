"""``python -m branchfold ...``: the same command line as the ``branchfold`` script."""

import sys

from branchfold.cli import main

if __name__ == "__main__":
    sys.exit(main())
