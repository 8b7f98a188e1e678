"""python -m rtrain COMMAND ...: the `rtrain` command (rtrain.cli.main) without the installed script."""

import sys

from rtrain.cli import main

if __name__ == "__main__":
    sys.exit(main())
