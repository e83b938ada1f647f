"""``python -m fine_infer.cli``: the same as the ``fine-infer`` console script."""

import sys

from fine_infer.cli import main

sys.exit(main())
