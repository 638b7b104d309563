"""A network-namespace lab: client → HAProxy (lb) → proxy daemon + services (workload).

Used by ``pymmproxy demo``, the e2e tests and the benchmarks. Needs root, ``nsenter``
(util-linux) and, for the lb, Debian's ``haproxy``. Nothing touches the host's network
namespace: namespaces are made like ``ip netns add`` does (see ``nsexec``), links,
addresses and routes with pyroute2, and every process runs inside one via
``nsenter --net=/run/netns/NAME``. Exports load lazily, so the small helpers run
in the namespaces (``python -m pymmproxy.lab.client`` / ``.services``) start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pymmproxy.lab.haproxy import DEFAULT_FRONTENDS, Frontend
    from pymmproxy.lab.lab import GO_MMPROXY, HTTP_GET, PYMMPROXY, Lab, build_lab, mmproxy_argv
    from pymmproxy.lab.nsexec import LabError, Ns, Proc
    from pymmproxy.lab.services import pattern
    from pymmproxy.lab.topology import (
        CLIENT_V4,
        CLIENT_V6,
        LB_BACK_V4,
        LB_BACK_V6,
        LB_FRONT_V4,
        LB_FRONT_V6,
        WORKLOAD_V4,
        WORKLOAD_V6,
    )

_HOME = {
    "Frontend": "haproxy",
    "DEFAULT_FRONTENDS": "haproxy",
    "GO_MMPROXY": "lab",
    "HTTP_GET": "lab",
    "PYMMPROXY": "lab",
    "Lab": "lab",
    "build_lab": "lab",
    "mmproxy_argv": "lab",
    "LabError": "nsexec",
    "Ns": "nsexec",
    "Proc": "nsexec",
    "pattern": "services",
}


def __getattr__(name: str) -> object:
    module = _HOME.get(name, "topology" if name.isupper() else None)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "CLIENT_V4",
    "CLIENT_V6",
    "DEFAULT_FRONTENDS",
    "GO_MMPROXY",
    "HTTP_GET",
    "LB_BACK_V4",
    "LB_BACK_V6",
    "LB_FRONT_V4",
    "LB_FRONT_V6",
    "PYMMPROXY",
    "WORKLOAD_V4",
    "WORKLOAD_V6",
    "Frontend",
    "Lab",
    "LabError",
    "Ns",
    "Proc",
    "build_lab",
    "mmproxy_argv",
    "pattern",
]
