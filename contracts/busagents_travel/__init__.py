"""Typed travel contracts of the busagents flight assistant."""
