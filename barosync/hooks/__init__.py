"""Plugin plumbing (the hook specifications, the values hooks take, the one plugin
manager) and the built-in plugins: JWT auth, wire codecs, the conflict strategies.
"""
