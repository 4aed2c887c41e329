"""Shared test setup. Hypothesis profiles: "ci" (the default) keeps the property suite within minutes on 2 CPU cores and
draws the same examples on every run, so whether CI passes never depends on the draw;
``pytest --hypothesis-profile nightly`` draws many more, different each run, to find new cases. And ``corpus``, the
token shards the tests that launch recipes train on."""

from pathlib import Path

import pytest
from hypothesis import settings

# Examples take seconds (a training run on worker processes), so no per-example deadline;
# print_blob prints a @reproduce_failure line next to the drawn values of a failing example.
# derandomize seeds each test's draws from the test itself (and implies no example database).
settings.register_profile("ci", max_examples=10, deadline=None, print_blob=True, derandomize=True)
settings.register_profile("nightly", max_examples=100, deadline=None, print_blob=True)
settings.load_profile("ci")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Token shards of the embedded default corpus, for tests that launch the recipes."""
    from gpt2_scale.data import default_source, prepare_shards

    out = tmp_path_factory.mktemp("corpus")
    prepare_shards(default_source(), out, workers=1, progress=False)
    return out
