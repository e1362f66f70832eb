"""Where clients find the streams service: ``STREAMS_URL``, else the request's host on ``STREAMS_PORT``."""

from django.conf import settings
from django.http import HttpRequest
from django.http.request import split_domain_port


def streams_base(request: HttpRequest) -> str:
    """The streams service's base URL as seen by the client of ``request`` (no trailing slash)."""
    if settings.STREAMS_URL:
        return str(settings.STREAMS_URL).rstrip("/")
    domain, _ = split_domain_port(request.get_host())
    host = f"[{domain}]" if ":" in domain else domain  # an IPv6 address
    return f"{request.scheme}://{host}:{settings.STREAMS_PORT}"
