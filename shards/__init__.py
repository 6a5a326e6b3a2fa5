"""The shard side: the pure operation engine, the per-shard store, and the shard actor."""
