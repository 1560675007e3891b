"""Runnable examples, importable from the repository root (``examples.byo_model:make_model``)."""
