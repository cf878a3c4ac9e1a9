"""Reading the audit log in the terminal: ``python -m aibridge report`` and ``export``."""
