"""``python -m attnlab.cli``: the ``attnlab`` command without the console script."""

import sys

from attnlab.cli import main

sys.exit(main())
