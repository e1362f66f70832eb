"""The streams service: long-lived streams (Server-Sent Events now, WebSockets next) served on an
event loop by their own ASGI process. A waiting stream holds no thread and no database connection;
one Redis pub/sub connection per process wakes them all (``hub``)."""
