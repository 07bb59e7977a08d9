"""Heretic: automatic removal of refusal behaviour from transformer language models."""

__version__ = "0.1.0"
