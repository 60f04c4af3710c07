"""Reliability tests: security, hostile input, restarts and outages."""
