"""What every geomirror package stands on: the error root and durable file writes.

`geomirror` wires `replication` and `bgp`, and those two never import `geomirror` or
each other; this package imports none of them, so all three can share it.
"""
