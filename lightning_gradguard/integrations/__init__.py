"""Optional integrations; each imports its third-party package lazily."""
