"""The live machinery: the single writer task, project rooms and their fan-out, and for
several nodes the rooms' sequencers, the Redis bus and presence.
"""
