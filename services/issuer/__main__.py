"""``python -m services.issuer``: the same as ``ztbank issuer run``."""

import sys

from services.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["issuer", "run", *sys.argv[1:]]))
