"""``python -m opdistill.cli``: the ``opd`` command (torchrun uses this form)."""

import sys

from opdistill.cli.app import main

sys.exit(main())
