"""Scoring answers (identity, leakage, perplexity) and the quality gate."""
