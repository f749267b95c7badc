"""Helpers the test tiers share: one copy each. Fixtures live in tests/conftest.py (every
tier) and in a tier's own conftest.py; this package holds plain functions and classes.

- paths: the repository root.
- net: a free loopback port.
- waiting: polling until a condition holds, from a thread or on the event loop.
- procs: real subprocesses (demo backends, `router serve`, the CLI), stopped by pid.
- redis_server: a real redis-server for the session.
- metric_names: the one list of metric names the router exports.
- contract_doc: the tables of docs/contracts.md.
- flag_files, signing, deploy_files: what two test modules of different tiers both read.
"""
