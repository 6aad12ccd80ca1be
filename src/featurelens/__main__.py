"""``python -m featurelens``: the ``featurelens`` command."""

import sys

from featurelens.cli import main

if __name__ == "__main__":
    sys.exit(main())
