"""``pymmproxy doctor``: check a host (or one instance, or one mark) and explain each failure.

Checks privileges, the firewall backend, every pathway (ip rules, local routes, CONNMARK
entries, loopback reply path) and, per instance, its listen address, targets and allow
list. Pure verdicts live in :mod:`.checks`, the probes in :mod:`.probes`, the command line
in :mod:`.cli`.
"""

from pymmproxy.doctor.cli import main

__all__ = ["main"]
