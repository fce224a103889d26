"""The web chat page: `python -m stages.web` (see __main__.py)."""
