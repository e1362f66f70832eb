"""``manage.py migrate_vm VM --to NODE [--mode live|cold]``: migrate a VM and follow its progress."""

import sys
import time
from typing import Any

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Q

from apps.core.conf import novacron_setting
from apps.core.errors import NovaCronError
from apps.migrations.choices import TERMINAL_STATUSES, MigrationMode
from apps.migrations.models import Migration
from apps.migrations.serializers import MigrationSerializer
from apps.migrations.services import migration_request
from apps.vms.models import VM, Node
from apps.vms.selectors import vm_by_reference


class Command(BaseCommand):
    help = "Migrate a VM to another node and follow it; exits non-zero unless it completes."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("vm", help="VM id or name")
        parser.add_argument(
            "--to", dest="node", help="destination node name or id (default: the scheduler picks)"
        )
        parser.add_argument("--mode", choices=[m.value for m in MigrationMode], default=MigrationMode.LIVE)
        parser.add_argument("--bandwidth-limit-mbps", type=int, default=None)
        parser.add_argument("--as", dest="username", default=novacron_setting("ADMIN_USERNAME"))
        parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to follow it")

    def handle(self, *args: Any, **options: Any) -> None:
        vm = self._vm(options["vm"])
        dest = self._node(options["node"]) if options["node"] else None
        user = User.objects.filter(username=options["username"]).first()
        if user is None:
            raise CommandError(f"no user {options['username']!r} (use --as)")
        try:
            migration = migration_request(
                vm=vm,
                requested_by=user,
                mode=MigrationMode(options["mode"]),
                dest_node=dest,
                bandwidth_limit_mbps=options["bandwidth_limit_mbps"],
            )
        except NovaCronError as exc:
            raise CommandError(exc.message) from exc
        self.stdout.write(
            f"migration {migration.pk}: {vm.name} {migration.source_node} -> {migration.dest_node}"
        )
        final = self._follow(migration, options["timeout"])
        if final.status != "completed":
            raise CommandError(f"migration {final.status}: {final.error or 'no detail'}")
        data = MigrationSerializer(final).data
        self.stdout.write(
            self.style.SUCCESS(
                f"completed in {data['total_seconds']} s, downtime {data['downtime_ms']} ms, "
                f"{data['wire_bytes']} bytes on the wire"
            )
        )

    def _follow(self, migration: Migration, timeout: float) -> Migration:
        deadline = time.monotonic() + timeout
        tty = sys.stdout.isatty()
        last_line = ""
        while time.monotonic() < deadline:
            migration.refresh_from_db()
            data = MigrationSerializer(migration).data
            percent = float(data["percent"])
            bar = "#" * int(percent / 2.5)
            line = f"[{bar:<40}] {percent:5.1f}% {migration.status} {migration.phase}"
            if line != last_line:
                self.stdout.write(("\r" + line) if tty else line, ending="" if tty else "\n")
                last_line = line
            if migration.status in TERMINAL_STATUSES:
                if tty:
                    self.stdout.write("")
                return migration
            time.sleep(0.5)
        raise CommandError(f"still {migration.status} after {timeout:g} s (migration {migration.pk})")

    def _vm(self, ref: str) -> VM:
        try:
            return vm_by_reference(ref)
        except LookupError as exc:
            raise CommandError(str(exc)) from None

    def _node(self, ref: str) -> Node:
        query = Q(name=ref) | (Q(pk=int(ref)) if ref.isdigit() else Q())
        node = Node.objects.filter(query).first()
        if node is None:
            raise CommandError(f"no node {ref!r}")
        return node
