"""Triton model-repository templates and Python-backend model.py files (package data).

Located with importlib.util.find_spec, never imported: importing would leave a __pycache__ folder
here, which Triton would try to load as a model."""
