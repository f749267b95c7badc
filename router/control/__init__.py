"""The control plane: where each tenant should go, and the tools that move it.

flags.py        flag sources (LaunchDarkly SDK, flag file), evaluated per tenant
flagfile.py     the flag file: read and write LaunchDarkly's file format
flagwriters.py  who writes the routing flag (flag file, LaunchDarkly API)
ledger.py       the ratchet ledger (SQLite, Redis): tenants that new has served
override.py     signed test overrides (X-Router-Target)
cutover.py      one tenant's cutover: hold, drain, verify, flip
migrate.py      thousands of cutovers from a tenant file, resumable
gate.py         the job gate: which side a background job may write to
"""
