"""apps/core/ids.py: ids as clients send them."""

import uuid

from apps.core.ids import uuid_text


def test_a_uuid_in_any_case_or_form_reads_as_its_canonical_text_and_anything_else_as_none():
    value = uuid.UUID("6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5b")
    for sent in (str(value), str(value).upper(), value.hex, f"{{{value}}}", value):
        assert uuid_text(sent) == str(value)
    for refused in ("", "-" * 36, "42", None, "6f1c2a3b-4d5e-4f60-8a9b-0c1d2e3f4a5"):
        assert uuid_text(refused) is None
