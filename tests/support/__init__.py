"""Shared test helpers (no tests): loopback fixtures, in-memory proxy, child processes."""
