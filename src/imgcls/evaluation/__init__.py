"""Evaluation: inference over splits, metrics, and trained runs loaded back."""
