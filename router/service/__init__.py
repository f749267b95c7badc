"""The process: composition, listeners, workers, the admin port, the build check.

app.py      composition root: builds the pieces once from Settings
server.py   event loop, listeners, signals, graceful drain
workers.py  worker processes sharing the proxy port (SO_REUSEPORT)
admin.py    admin port: health, readiness, metrics, tenant views
native.py   which build runs: compiled (and fresh) or pure Python
"""
