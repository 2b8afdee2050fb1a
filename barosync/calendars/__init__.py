"""CalDAV for calendar apps: discovery, PROPFIND, REPORT, PUT and DELETE through the
one write path, app passwords.
"""
