"""TLS mechanism: immutable contexts, the current-context store, the socket-level stream, listeners."""
