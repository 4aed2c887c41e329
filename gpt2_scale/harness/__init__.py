"""The reproducibility harness: every engine must train the same model as a plain single process."""
