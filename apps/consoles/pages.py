"""The console page of a VM, ``/vms/<id>/console/``: xterm.js in the browser on the VM's serial console;
and ``/vms/console/?vm=<id or name>``, which finds a VM's page (the dashboard's "Console" form).

Who sees the page is decided as the REST API decides who sees the VM: staff every VM, others the VMs
of the projects they are members of; another project's VM (or a deleted one) is a 404, as an unknown
one. A reader gets the page with a message saying their role cannot type into a console, and no
terminal. An anonymous visitor is sent to the login page (any user's, not the admin's staff one).

The page holds no console itself: its script (``static/consoles/console.js``) asks the REST API for a
ticket (session cookie + CSRF token, acting in the VM's project via ``X-Project``) and opens the
WebSocket on the streams service that the answer names.
"""

import uuid
from typing import Any

from django.contrib.auth.decorators import login_required
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse

from apps.core.ids import uuid_text
from apps.projects.acting import caller
from apps.projects.models import Role, role_allows
from apps.vms.choices import VMState
from apps.vms.models import VM

CONSOLE_ROLE = Role.MEMBER  # the ticket endpoint's need: opening a console is acting on the VM


def console_path(vm_id: uuid.UUID | str) -> str:
    """Where the console page of ``vm_id`` is (for links from the admin, dashboard and API)."""
    return reverse("vm-console-page", kwargs={"vm_id": vm_id})


@login_required(login_url="rest_framework:login")
def console_page(request: HttpRequest, vm_id: uuid.UUID) -> HttpResponse:
    live = VM.objects.select_related("node", "project").exclude(state=VMState.DELETED)
    vm = get_object_or_404(live, pk=vm_id)
    user: Any = request.user
    role = None if user.is_staff else caller(request, user).role(vm.project_id)
    if not user.is_staff and role is None:
        raise Http404("No such VM.")
    may_type = user.is_staff or role_allows(role, CONSOLE_ROLE)
    page = {
        "vm": str(vm.pk),
        "name": vm.name,
        "project": vm.project_id,
        "ticket_url": reverse("vm-console", kwargs={"pk": vm.pk}),
        "may_type": may_type,
    }
    context = {"vm": vm, "role": role, "needed": CONSOLE_ROLE.value, "may_type": may_type, "page": page}
    return render(request, "consoles/console.html", context)


def _visible_live_vms(request: HttpRequest) -> QuerySet[VM]:
    """The VMs whose console page ``request``'s user may open: staff all, others their projects'."""
    user: Any = request.user
    live = VM.objects.select_related("project").exclude(state=VMState.DELETED)
    if user.is_staff:
        return live
    return live.filter(project_id__in=[project for project, _ in caller(request, user).roles])


@login_required(login_url="rest_framework:login")
def console_find(request: HttpRequest) -> HttpResponse:
    """``?vm=``: a VM's id, or its name: one VM of that name goes to its page, several are listed."""
    wanted = request.GET.get("vm", "").strip()
    vm_id = uuid_text(wanted)
    if vm_id is not None:
        return redirect(console_path(vm_id))
    found = list(_visible_live_vms(request).filter(name=wanted).order_by("project__name")[:50])
    if len(found) == 1:
        return redirect(console_path(found[0].pk))
    status = 200 if found else 404
    return render(request, "consoles/find.html", {"wanted": wanted, "found": found}, status=status)
