"""Writing to sockets and timers: what the data plane moves bytes and time with."""
