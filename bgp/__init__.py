"""ExaBGP integration: config rendering, the API helper process, the speaker.

Never imports ``geomirror`` or ``replication``.
"""
