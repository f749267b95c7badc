"""The `router` command: one module per command group, shared helpers in common.py.

main.py     the parser, `serve`, `check-config`, `explain`, `flags set`
tenants.py  `router tenants ...`: the ratchet ledger
sign.py     `router sign`: signed test overrides
cutover.py  `router cutover` and `router migrate`
shadow.py   `router shadow ...`: the shadow traffic report
"""
