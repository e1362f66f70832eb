"""Ids of the API's objects as clients send them."""

import uuid


def uuid_text(value: object) -> str | None:
    """``value`` as a UUID in its canonical text (URLs take any case and form); None when it is no UUID."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        return None
