"""The command-line tools, one module per tool, each with ``main(argv=None) -> exit code``.

A tool runs the same code three ways: ``python tools/NAME.py`` (a wrapper in the checkout, as the README uses),
the console script ``gpt2-NAME`` that an install puts on PATH (pyproject's [project.scripts], ``_`` written ``-``),
and ``python -m gpt2_scale.tools.NAME``.
"""
