"""A crust :class:`~crust.aio.portmap.PortMapper` run inside a lab namespace, driven by JSON
lines (used by ``test_portmap_lab.py``).

    python portmap_agent.py '{"requests": [["tcp", 4000], ["udp", 4001]], "methods": ["pcp"]}'

Prints ``{"event": "ready"}``, then ``granted`` / ``error`` events as they happen; reads one
command per line on stdin and answers each with one line:

``{"cmd": "mappings"}``        the mappings held
``{"cmd": "renew"}``           renew all now, answer after that round
``{"cmd": "upnp_list"}``       the IGD's table through our GetGenericPortMappingEntry
``{"cmd": "natpmp_external"}`` the external address through our NAT-PMP client
``{"cmd": "close"}``           close the mapper (deletes the mappings), then exit
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from typing import Any

from crust.aio.portmap import (
    GrantedMapping,
    IgdClient,
    MappingRequest,
    NatPmpClient,
    PortMapper,
    default_gateway,
)
from crust.errors import PortMappingError


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def granted_json(m: GrantedMapping) -> dict[str, Any]:
    return dataclasses.asdict(m)


async def main(config: dict[str, Any]) -> int:
    requests = [MappingRequest(p, int(port)) for p, port in config["requests"]]
    mapper = PortMapper(
        requests,
        methods=tuple(config.get("methods", ("pcp", "natpmp", "upnp"))),
        lifetime=int(config.get("lifetime", 7200)),
        on_granted=lambda m: emit({"event": "granted", **granted_json(m)}),
        on_error=lambda e: emit({"event": "error", "error": type(e).__name__, "message": str(e)}),
        description="crust-lab",
    )
    loop = asyncio.get_running_loop()
    async with mapper:
        emit({"event": "ready"})
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)["cmd"]
            try:
                if cmd == "mappings":
                    emit(
                        {
                            "event": "mappings",
                            "mappings": [granted_json(m) for m in mapper.mappings()],
                        }
                    )
                elif cmd == "renew":
                    mapper.round_done.clear()
                    before = mapper.rounds
                    mapper.renew_now()
                    await asyncio.wait_for(mapper.round_done.wait(), 30)
                    emit({"event": "renewed", "rounds": mapper.rounds - before})
                elif cmd == "upnp_list":
                    client = await IgdClient.discover(default_gateway())
                    entries = await client.port_mappings()
                    emit(
                        {"event": "upnp_list", "entries": [dataclasses.asdict(e) for e in entries]}
                    )
                elif cmd == "natpmp_external":
                    gateway = default_gateway()
                    assert gateway is not None
                    nat = NatPmpClient(gateway)
                    try:
                        emit({"event": "natpmp_external", "address": await nat.external_address()})
                    finally:
                        nat.close()
                elif cmd == "close":
                    await mapper.aclose()
                    emit({"event": "closed", "mappings": len(mapper.mappings())})
                    break
                else:
                    emit({"event": "error", "error": "BadCommand", "message": cmd})
            except PortMappingError as exc:
                emit(
                    {
                        "event": "failed",
                        "cmd": cmd,
                        "error": type(exc).__name__,
                        "message": str(exc),
                    }
                )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(json.loads(sys.argv[1]))))
