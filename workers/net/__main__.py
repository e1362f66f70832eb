"""``python -m workers.net --tag T --address A --port P --state-dir D COMMAND < request.json``

Drives a node's data plane from outside a node worker, in whatever network namespace it runs in
(``ip netns exec NS python -m workers.net ...``): the tests build "nodes" in namespaces this way, and
an operator can reconcile or inspect a node by hand. Commands and their JSON request on stdin:
``attach {"vm", "nics"}``, ``detach {"vm"}``, ``peers {"peers", "complete"}``,
``reconcile {"vms": {uuid: nics}, "peers"?}``, ``probe`` (prints the capability probe's verdict).
"""

import argparse
import json
import sys
from pathlib import Path

from .dataplane import DataPlane, NetSettings, parse_physical_networks, probe
from .model import NetworkError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m workers.net", description="Drive a node's network data plane."
    )
    p.add_argument("--tag", required=True, help="the node's device tag (four hex digits)")
    p.add_argument("--address", required=True, help="the node's underlay IPv4 address")
    p.add_argument("--port", type=int, required=True, help="the node's VXLAN UDP port")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--physical-networks", default="", help="NAME=INTERFACE,...")
    p.add_argument("command", choices=["attach", "detach", "peers", "reconcile", "probe"])
    args = p.parse_args(argv)
    try:
        problem = probe(args.address)
        if args.command == "probe":
            print(problem or "ok")
            return 0
        plane = DataPlane(
            NetSettings(
                tag=args.tag,
                underlay_address=args.address,
                vxlan_port=args.port,
                state_dir=args.state_dir,
                physical_networks=parse_physical_networks(args.physical_networks),
            ),
            problem=problem,
        )
        request = json.load(sys.stdin)
        if args.command == "attach":
            plane.attach(request["vm"], request["nics"])
        elif args.command == "detach":
            plane.detach(request["vm"])
        elif args.command == "peers":
            plane.set_peers(request["peers"], complete=request["complete"])
        else:
            plane.reconcile(request["vms"], request.get("peers"))
    except (NetworkError, KeyError, ValueError) as exc:
        print(f"workers.net: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
