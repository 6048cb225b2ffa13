"""Hookyard's built-in plugins: providers and actions, registered like any third-party plugin."""
