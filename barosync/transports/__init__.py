"""Sockets: listening, HTTP (h11) routing, the WebSocket connection and its outbox,
REST, static files, metrics.
"""
