"""Site-evacuation drills: pre-flight checks, a timed planned switchover (optionally there and
back), the report (JSON and a self-contained HTML page) and where reports are kept.

checks   pure: is the pair healthy enough to move the guest (from both sites' status)
report   pure: step timings of a move from both sites' timelines, budgets, the verdict
html     pure: the report as one HTML page with an inline SVG timeline
probes   the operator's probes (TCP connect, memcached `version`) and their longest stall
runner   the drill: talks to both sites' control APIs, moves the guest, rolls back
store    at each site's daemon: reports under state_dir/drills/, the drill claim, metrics
"""
