"""`gpt2-eval-hellaswag` from a checkout: the tool is gpt2_scale/tools/eval_hellaswag.py (the package must be installed, e.g. pip install -e .)."""

import sys

from gpt2_scale.tools.eval_hellaswag import main

if __name__ == "__main__":
    sys.exit(main())
