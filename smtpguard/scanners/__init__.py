"""Bundled scanners."""
