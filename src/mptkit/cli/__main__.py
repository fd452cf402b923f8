"""``python -m mptkit.cli`` (e.g. under ``torchrun ... -m mptkit.cli train RECIPE.yaml``)."""

import sys

from mptkit.cli import main

sys.exit(main())
