"""The mutation check (tests/support/mutation.py): each core guarantee broken in a temporary
copy of the tree must fail the tests that guard it.

    python -m tests.mutation [--fast] [--list] [--mutmut] [NAME ...]
"""

import sys

from tests.support.mutation import main

if __name__ == "__main__":
    sys.exit(main())
