"""``python -m seqblocks``: the ``seqblocks`` command line (also under ``torchrun -m seqblocks``)."""

import sys

from seqblocks.cli import main

if __name__ == "__main__":
    sys.exit(main())
