"""``python -m pub_native.demo [options]``: the same as ``python -m pub_native demo``."""

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
