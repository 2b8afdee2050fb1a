"""The application core and its use cases (subscribe, submit a mutation, queries, the
WebSocket session): trio, no sockets. Transports call it; it reaches them only
through interfaces they fill.
"""
