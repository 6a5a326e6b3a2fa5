"""The cluster side: slot map, router actor, and bootstrap (create-or-attach, shutdown)."""
