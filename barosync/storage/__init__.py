"""The change log: the commit rules written once, LMDB's and PostgreSQL's stores, reads
from the event loop, backup/restore/check. Synchronous; never reaches the plugin
manager or the layers above.
"""
