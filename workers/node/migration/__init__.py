"""The node's side of migrations, by role and step.

``runner`` binds the contract's migration tasks to the two roles: ``source`` (send, abort, cleanup
after the switch) and ``destination`` (prepare, the live switch or the cold finish, abort), which
share ``context`` (settings, driver, Redis, reports, per-VM locks). ``qmp_steps`` holds the QMP
sequences of a live migration, ``transfer`` the source's progress and control knobs, ``memory_check``
the RAM comparison at the switch, ``markers`` which migration and role a copy belongs to, and
``leftovers`` the copies a restarted worker finds.

Live migration follows the sequence measured on QEMU 7.2 (see the design notes): the destination
QEMU waits with ``-incoming defer -S`` behind an NBD export of its empty disk; the source mirrors
its disk into that export through one DWCP tunnel until READY, then migrates RAM through a second
tunnel with ``pause-before-switchover``; at the pause it cancels the ready mirror (a consistent
finish) and lets the migration complete. With both copies paused, the two nodes compare the guest's
RAM (QEMU 7.2 under TCG was measured losing writes); a watcher on the destination resumes the guest
once its incoming migration completed and the check passed, and reports the switch; only then does
the control plane move the VM. Anything that fails before the switch, a failed memory check
included, leaves the source running.
"""
