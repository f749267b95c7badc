"""The data plane: what every request runs through, compiled with mypyc (setup.py).

    connection.py  client connections: HTTP/1.1 parsing, framing, keep-alive, limits
    handler.py     the request phases: admit -> identify -> decide -> forward -> relay -> record
    identify.py    phase identify: the tenant from the request (extractors)
    decide.py      phase decide: the side for the tenant (flag, ratchet, hold, overrides)
    relay.py       phases forward and relay: request head, streaming both ways
    upstream.py    keep-alive connection pools to the two sides
    metrics.py     phase record: Prometheus metrics
    accesslog.py   phase record: one JSON line per request
    shadow.py      copies of safe requests to new, compared off the hot path (not compiled)

Nothing here imports the control plane's tools (cutover, migrate, flag writers) or the CLI.
"""
