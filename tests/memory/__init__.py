"""Real components on MemoryReactorClock and StringTransport: no sockets, no waiting."""
