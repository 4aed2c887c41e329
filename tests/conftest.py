"""Hypothesis profiles: "ci" (the default) keeps the property suite within minutes on 2 CPU cores;
``pytest --hypothesis-profile nightly`` draws many more examples."""

from hypothesis import settings

# Examples take seconds (a training run on worker processes), so no per-example deadline;
# print_blob prints a @reproduce_failure line next to the drawn values of a failing example.
settings.register_profile("ci", max_examples=10, deadline=None, print_blob=True)
settings.register_profile("nightly", max_examples=100, deadline=None, print_blob=True)
settings.load_profile("ci")
