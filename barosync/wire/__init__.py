"""The WebSocket protocol's messages: envelopes in, frames out, error and close codes.
Plain functions, no sockets.
"""
