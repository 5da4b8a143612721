"""Consumers' budgets (requests and body bytes per second): the arithmetic
(`budget`), a replica's own limiter (`local`) and the limiter shared by every
replica through Redis (`resp`, `shared`)."""
