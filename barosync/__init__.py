"""barosync: a self-hosted real-time sync server for team calendars."""

__version__ = "0.1.0"
