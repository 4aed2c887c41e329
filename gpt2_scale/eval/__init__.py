"""Downstream evaluations run during training and standalone (HellaSwag)."""
