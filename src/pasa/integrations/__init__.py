"""Integrations of PASA with model libraries (diffusers)."""
