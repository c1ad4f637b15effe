"""``python -m llmfirst_kit.cli``: the ``llmfirst`` command."""

import sys

from . import main

sys.exit(main())
