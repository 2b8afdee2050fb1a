"""Plain values and rules: events, identities, dates, recurrence bounds, token buckets.
No IO, no trio; imports nothing of barosync.
"""
