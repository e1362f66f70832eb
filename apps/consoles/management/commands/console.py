"""``manage.py console VM``: attach this terminal to a VM's serial console (the VM's name or uuid).

For operators: it runs with the control plane's settings and DWCP secret, so it needs no user or
ticket, and goes straight over DWCP through :class:`apps.consoles.link.ConsoleLink` (following a
live migration as the WebSocket does). The terminal is put in raw mode while attached; Ctrl-] leaves,
as in telnet and ``virsh console``. Status lines go to stderr, the console's bytes to stdout.
"""

import asyncio
import contextlib
import os
import sys
import termios
import tty
from typing import Any, Final

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.consoles.link import CLOSE_NORMAL, ConsoleEvent, ConsoleLink, Ending, drain_cleanups
from apps.vms.selectors import vm_by_reference

ESCAPE: Final = b"\x1d"  # Ctrl-]
READ_SIZE: Final = 4096


class Command(BaseCommand):
    help = "Attach the terminal to a VM's serial console (Ctrl-] to quit)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("vm", help="the VM's name or uuid")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            vm = vm_by_reference(options["vm"])
        except LookupError as exc:
            raise CommandError(str(exc)) from None
        self.stderr.write(f"Console of VM {vm.name} ({vm.pk}); Ctrl-] quits.")
        stdin = sys.stdin.fileno()
        saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
        try:
            if saved is not None:
                tty.setraw(stdin)
            ending = asyncio.run(self._attach(str(vm.pk), stdin))
        finally:
            if saved is not None:
                termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        if ending is None:
            self.stderr.write("\nDetached.")
        elif ending.code == CLOSE_NORMAL:
            self.stderr.write(f"\nConsole closed: {ending.reason}.")
        else:
            raise CommandError(f"console closed: {ending.reason}")

    async def _attach(self, vm_id: str, stdin: int) -> Ending | None:
        """Until the console ends (its :class:`Ending`) or Ctrl-] (None)."""
        loop = asyncio.get_running_loop()
        detached = loop.create_future()
        stdout = sys.stdout.fileno()

        async def output(data: bytes) -> None:
            os.write(stdout, data)

        async def event(message: ConsoleEvent) -> None:
            detail = message.get("node") or message.get("reason") or ""
            sys.stderr.write(f"\r\n[console {message['event']}: {detail}]\r\n")
            sys.stderr.flush()
            if message["event"] == "connected" and not reading:
                reading.append(True)  # what is typed before the first connection waits for it
                loop.add_reader(stdin, typed)

        link = ConsoleLink(vm_id, output=output, event=event)
        sending: set[asyncio.Task[None]] = set()
        reading: list[bool] = []

        def typed() -> None:
            data = os.read(stdin, READ_SIZE)
            before, escape, _ = data.partition(ESCAPE)
            if before:
                task = loop.create_task(link.send(before))
                sending.add(task)
                task.add_done_callback(sending.discard)
            if (escape or not data) and not detached.done():  # Ctrl-], or the end of a piped input
                detached.set_result(None)

        running = loop.create_task(link.run())
        try:
            await asyncio.wait({running, detached}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            loop.remove_reader(stdin)
            if not running.done():
                running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
            await drain_cleanups()  # the tunnel ends cleanly: the node sees its viewer leave
        return None if detached.done() else running.result()
