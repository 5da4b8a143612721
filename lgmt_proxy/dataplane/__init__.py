"""The bytes' path: client connections, exchanges, upstream connections and pools, tunnels."""
