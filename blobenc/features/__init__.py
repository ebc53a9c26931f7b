"""Trunks, image loading, the feature cache and extraction."""
