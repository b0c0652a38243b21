"""`python -m leviathan.cli`: the `leviathan` command, for a checkout without the script."""

import sys

from leviathan.cli import main

if __name__ == "__main__":
    sys.exit(main())
