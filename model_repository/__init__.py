"""Triton model-repository templates and Python-backend model.py files (package data)."""
