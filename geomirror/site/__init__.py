"""One site's service, split by job around one `SiteContext` (see context.py).

daemon (lifecycle, owns the HA machine, operator entry points) · role (role.json) ·
gate_policy (pure: the gate's mode and permission) · effects (carries out HA actions) ·
primary_side · standby_side · switchover · host (TAP) · guest_spec · status.
"""
