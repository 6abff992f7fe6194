"""Petal's Fleet API interop fixture."""
