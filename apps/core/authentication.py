"""Token authentication in one prepared-shape SQL query, without the ORM's per-request compile.

Every API request authenticates, so DRF's ``TokenAuthentication`` look-up
(``Token.objects.select_related("user").get(key=...)``) is on every path, the cached ones included;
building that query through the ORM costs more CPU than running it. This class runs the same join
as a fixed SQL string and builds the user and token with ``Model.from_db``: same answers (the user,
401 "Invalid token." or "User inactive or deleted."), no caching, so a revoked token or a
deactivated user is refused on the next request as before.
"""

from functools import cache
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser
from django.db import connection
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication
from rest_framework.authtoken.models import Token


def _columns(model: Any) -> dict[str, str]:
    """``attname -> column`` of a model's concrete fields (``user_id -> user_id``)."""
    return {field.attname: str(field.column) for field in model._meta.concrete_fields}


@cache
def _lookup_sql() -> tuple[str, list[str], list[str]]:
    """The join of token and user, and the field names of each (built once per process)."""
    quote = connection.ops.quote_name
    user_model = get_user_model()
    token_columns, user_columns = _columns(Token), _columns(user_model)
    selected = [f"t.{quote(column)}" for column in token_columns.values()] + [
        f"u.{quote(column)}" for column in user_columns.values()
    ]
    # Identifiers only, from the models' metadata, quoted; the key is a query parameter.
    sql = (
        f"SELECT {', '.join(selected)} FROM {quote(Token._meta.db_table)} t "  # noqa: S608
        f"JOIN {quote(user_model._meta.db_table)} u ON u.{quote(user_columns['id'])} = "
        f"t.{quote(token_columns['user_id'])} WHERE t.{quote(token_columns['key'])} = %s"
    )
    return sql, list(token_columns), list(user_columns)


class FastTokenAuthentication(TokenAuthentication):
    """``Authorization: Token <key>`` as DRF does it, with one fixed SQL query."""

    def authenticate_credentials(self, key: str) -> tuple[AbstractBaseUser, Any]:
        sql, token_fields, user_fields = _lookup_sql()
        with connection.cursor() as cursor:
            cursor.execute(sql, [key])
            row = cursor.fetchone()
        if row is None:
            raise exceptions.AuthenticationFailed("Invalid token.")
        token = Token.from_db(connection.alias, token_fields, row[: len(token_fields)])
        user = get_user_model().from_db(connection.alias, user_fields, row[len(token_fields) :])
        if not user.is_active:
            raise exceptions.AuthenticationFailed("User inactive or deleted.")
        token.user = user
        return user, token
