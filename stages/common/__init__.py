"""Shared pieces of the stages: params schema, errors, atomic IO, runtime, chat formats/templates, models."""
