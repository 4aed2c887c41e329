"""`gpt2-export` from a checkout: the tool is gpt2_scale/tools/export.py (the package must be installed, e.g. pip install -e .)."""

import sys

from gpt2_scale.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
