"""``python -m lessons_lib run|list``: see :mod:`lessons_lib.runner`."""
import sys

from lessons_lib.runner import main

sys.exit(main())
