"""Data augmentation."""

__all__ = []
