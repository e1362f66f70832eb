"""Database helpers shared by the apps' migrations."""

from typing import Any

from django.db.migrations.operations import AddIndex


class AddIndexConcurrentlyWherePossible(AddIndex):
    """``CREATE INDEX CONCURRENTLY`` on PostgreSQL, so a live table keeps taking writes; plain elsewhere.

    The migration using it must set ``atomic = False``: PostgreSQL refuses CONCURRENTLY in a transaction.
    """

    def database_forwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        model = to_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.add_index(model, self.index, concurrently=True)
        else:
            schema_editor.add_index(model, self.index)

    def database_backwards(self, app_label: str, schema_editor: Any, from_state: Any, to_state: Any) -> None:
        model = from_state.apps.get_model(app_label, self.model_name)
        if not self.allow_migrate_model(schema_editor.connection.alias, model):
            return
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.remove_index(model, self.index, concurrently=True)
        else:
            schema_editor.remove_index(model, self.index)

    def describe(self) -> str:
        return f"{super().describe()} (concurrently on PostgreSQL)"
