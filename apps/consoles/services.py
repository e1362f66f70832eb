"""Opening a VM's console: the checks and the ticket (the view has already applied tenancy and roles)."""

from dataclasses import dataclass

from apps.core.errors import InvalidState
from apps.vms.models import VM

from .link import OPEN_STATES
from .tickets import TICKET_TTL_SECONDS, ticket_issue


@dataclass(frozen=True)
class ConsoleGrant:
    """A ticket for one WebSocket connection to ``vm_id``'s console, valid ``expires_in`` seconds."""

    vm_id: str
    ticket: str
    expires_in: int


def console_open(*, vm: VM, user_id: int) -> ConsoleGrant:
    """A ticket for ``user_id`` to open ``vm``'s console; ``InvalidState`` (409) unless it runs."""
    if vm.state not in OPEN_STATES or vm.node_id is None:
        raise InvalidState(f"VM {vm.name} is {vm.state}: its console can be opened while it runs.")
    ticket = ticket_issue(user_id=user_id, vm_id=str(vm.pk))
    return ConsoleGrant(vm_id=str(vm.pk), ticket=ticket, expires_in=TICKET_TTL_SECONDS)
