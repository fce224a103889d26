"""Params schema, user errors, atomic IO, runtime setup, the environment record."""
