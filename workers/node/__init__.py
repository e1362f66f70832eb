"""The node worker: one per hypervisor host, started as ``python -m workers.node``.

It consumes the Celery queue ``node.<name>``, drives QEMU through ``workers.qemu``, runs the DWCP
server, and reports to the control queue and Redis. It never imports Django and holds no database
credentials: the control worker records everything it reports.
"""
