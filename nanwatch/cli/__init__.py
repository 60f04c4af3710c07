"""The ``nanwatch`` command line: serve, runs, status, halt, demo."""
