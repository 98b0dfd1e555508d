"""Trainers of the shipped models (one module per model family; see docs/training.md)."""
