"""User data formats, chat templates with assistant-only labels, packing and batching."""
