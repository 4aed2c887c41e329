"""`gpt2-estimate-memory` from a checkout: the tool is gpt2_scale/tools/estimate_memory.py (the package must be installed, e.g. pip install -e .)."""

import sys

from gpt2_scale.tools.estimate_memory import main

if __name__ == "__main__":
    sys.exit(main())
