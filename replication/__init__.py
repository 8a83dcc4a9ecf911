"""The checkpoint pipeline: guest driver, capture, codec, channel, store, gate, pacer.

Never imports ``geomirror`` or ``bgp``.
"""
