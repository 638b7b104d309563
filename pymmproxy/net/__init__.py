"""Socket set-up and byte relaying (the I/O edge)."""
