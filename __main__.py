"""``python -m sparse_transformer``: the same as the ``sparse-transformer`` command."""

import sys

from sparse_transformer.cli import main

sys.exit(main())
