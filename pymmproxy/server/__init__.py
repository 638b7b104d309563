"""Connection handling: TCP connections, UDP flows, listener lifecycle."""
