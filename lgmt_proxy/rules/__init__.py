"""Pure decisions: routes, policy, header rules, refusals and failure mapping (no reactor)."""
