"""iCalendar in and out: an event as a CalDAV resource, an .ics import, occurrences in
a time range.
"""
