"""``python -m shardopt.checkpoint``: the ``shardopt-ckpt`` command line."""

import sys

from ._cli import main

sys.exit(main())
