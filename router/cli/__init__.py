"""The `router` command: one module per command group, shared helpers in common.py.

main.py     the parser, `serve`, `check-config`, `explain`, `flags set`
shadow.py   `router shadow ...`: the shadow traffic report
cutover.py  `router cutover` and `router migrate`
tenants.py  `router tenants ...`: the ratchet ledger
sign.py     `router sign`: signed test overrides
common.py   exit statuses, usage errors, config and admin-port helpers, argument types
"""
