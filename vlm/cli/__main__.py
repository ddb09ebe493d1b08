"""``python -m vlm.cli`` (what ``torchrun -m vlm.cli ...`` runs): the ``vlm`` console script."""
import sys

from vlm.cli import main

sys.exit(main())
