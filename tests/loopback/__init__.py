"""The real reactor with sockets on 127.0.0.1: proxy, upstreams and clients in this process."""
