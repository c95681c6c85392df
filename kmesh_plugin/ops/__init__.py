"""Operator tools: explain, dump, status."""
