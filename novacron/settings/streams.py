"""The streams service (``novacron.asgi``): its public URL, port, CORS origins and limits."""

from .env import env, env_int, env_list

STREAMS_PORT = env_int("STREAMS_PORT", 8001, help="Port of the streams service (SSE, later WebSockets).")
STREAMS_URL = env(
    "STREAMS_URL",
    "",
    help="Public base URL of the streams service, e.g. https://streams.example.org; empty: "
    "http://<the request's host>:<STREAMS_PORT>.",
)
STREAMS_ALLOWED_ORIGINS = env_list(
    "STREAMS_ALLOWED_ORIGINS",
    [],
    help="Exact origins (scheme://host:port) of pages allowed to open streams with credentials (CORS).",
)
STREAMS_MAX_PER_PROCESS = env_int(
    "STREAMS_MAX_PER_PROCESS", 2000, help="Open streams one streams process holds before answering 429."
)
STREAMS_MAX_PER_USER = env_int(
    "STREAMS_MAX_PER_USER", 50, help="Open streams one user may hold in one streams process (429 beyond)."
)
STREAMS_MAX_SECONDS = env_int(
    "STREAMS_MAX_SECONDS", 3600, help="Longest life of one stream; the client reconnects after it."
)
STREAMS_KEEPALIVE_SECONDS = env_int(
    "STREAMS_KEEPALIVE_SECONDS", 15, help="Seconds between keepalive comments on an idle stream."
)
CONSOLE_MAX_PER_USER = env_int(
    "CONSOLE_MAX_PER_USER", 10, help="Open consoles one user may hold in one streams process (4429 beyond)."
)
CONSOLE_MAX_PER_VM = env_int(
    "CONSOLE_MAX_PER_VM", 16, help="Open consoles of one VM in one streams process (4429 beyond)."
)
