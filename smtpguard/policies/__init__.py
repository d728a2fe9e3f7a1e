"""Bundled policies."""
