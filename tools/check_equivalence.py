"""`gpt2-check-equivalence` from a checkout: the tool is
gpt2_scale/tools/check_equivalence.py (the package must be installed, e.g. pip install -e .)."""

import sys

from gpt2_scale.tools.check_equivalence import main

if __name__ == "__main__":
    sys.exit(main())
