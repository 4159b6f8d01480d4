"""UPnP IGD port mapping (peerpath.nat.upnp) against stand-ins for the SSDP search and the
gateway's SOAP service: which answers are trusted, and what is asked after each refusal.
(The lab test runs it against a real IGD on a lab router.)"""

from __future__ import annotations

from typing import Any

import pytest
from async_upnp_client.exceptions import UpnpActionError

from peerpath.nat import upnp
from peerpath.nat.portmap import PortMapUnavailable

GATEWAY = "10.0.0.1"


class Action:
    def __init__(self, service: Service, name: str) -> None:
        self.service, self.name = service, name

    async def async_call(self, **arguments: Any) -> dict[str, Any]:
        self.service.calls.append((self.name, arguments))
        refusal = self.service.refusals.pop(0) if self.name == "AddPortMapping" and self.service.refusals else None
        if refusal is not None:
            raise UpnpActionError(error_code=refusal, error_desc="refused")
        return {"NewExternalIPAddress": "198.51.100.9"} if self.name == "GetExternalIPAddress" else {}


class Service:
    service_type = "urn:schemas-upnp-org:service:WANIPConnection:1"

    def __init__(self, refusals: list[int] | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.refusals = list(refusals or [])

    def action(self, name: str) -> Action:
        return Action(self, name)


def mapper(service: Service) -> upnp.UpnpMapper:
    m = upnp.UpnpMapper(GATEWAY, local_ip="10.0.0.2")
    m._service = service  # type: ignore[assignment]  # found already
    return m


async def test_a_mapping_asks_for_the_internal_port_and_reports_the_external_address() -> None:
    service = Service()
    mapping = await mapper(service).map("udp", 41641, lifetime=7200)
    assert mapping.external == ("198.51.100.9", 41641) and mapping.method == "upnp"
    assert mapping.lifetime == upnp.ASSUMED_LEASE  # renewed well before any cap a router may apply
    name, args = service.calls[-1]
    assert name == "AddPortMapping"
    assert args["NewExternalPort"] == 41641 and args["NewInternalPort"] == 41641 and args["NewProtocol"] == "UDP"
    assert args["NewInternalClient"] == "10.0.0.2" and args["NewRemoteHost"] == "" and args["NewLeaseDuration"] == 7200


async def test_a_taken_external_port_moves_on_to_another() -> None:
    service = Service(refusals=[upnp.CONFLICT])
    mapping = await mapper(service).map("tcp", 41641)
    tried = [args["NewExternalPort"] for name, args in service.calls if name == "AddPortMapping"]
    assert tried[0] == 41641 and len(tried) == 2 and mapping.external[1] == tried[1] != 41641


async def test_a_router_that_only_takes_permanent_leases_gets_one() -> None:
    service = Service(refusals=[upnp.ONLY_PERMANENT])
    mapping = await mapper(service).map("udp", 41641)
    leases = [(a["NewExternalPort"], a["NewLeaseDuration"]) for n, a in service.calls if n == "AddPortMapping"]
    assert leases == [(41641, upnp.LIFETIME), (41641, 0)] and mapping.external[1] == 41641


async def test_any_other_refusal_is_a_clear_error() -> None:
    with pytest.raises(PortMapUnavailable, match="refused: 606"):
        await mapper(Service(refusals=[606])).map("udp", 41641)


async def test_deleting_names_the_external_port() -> None:
    service = Service()
    m = mapper(service)
    await m.unmap(await m.map("udp", 41641))
    assert service.calls[-1] == (
        "DeletePortMapping",
        {"NewRemoteHost": "", "NewExternalPort": 41641, "NewProtocol": "UDP"},
    )


class Device:
    def __init__(self, services: list[Service]) -> None:
        self.all_services = services


async def test_only_the_default_gateway_is_believed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An SSDP answer from another host on the LAN is not the router, whatever it says."""
    created: list[str] = []

    class Listener:
        def __init__(self, async_callback: Any, **_: Any) -> None:
            self.callback = async_callback

        async def async_start(self) -> None:
            await self.callback({"location": "http://10.0.0.66:5000/rootDesc.xml"})
            await self.callback({"location": f"http://{GATEWAY}:5000/rootDesc.xml"})

        def async_search(self) -> None:
            pass

        def async_stop(self) -> None:
            pass

    class Factory:
        def __init__(self, *_: Any, **__: Any) -> None:
            pass

        async def async_create_device(self, location: str) -> Device:
            created.append(location)
            return Device([Service()])

    monkeypatch.setattr(upnp, "SsdpSearchListener", Listener)
    monkeypatch.setattr(upnp, "UpnpFactory", Factory)
    m = upnp.UpnpMapper(GATEWAY, local_ip="10.0.0.2", search_seconds=1)
    mapping = await m.map("udp", 41641)
    assert created == [f"http://{GATEWAY}:5000/rootDesc.xml"] and m.answered and mapping.external[1] == 41641


async def test_no_gateway_answering_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class Silent:
        def __init__(self, **_: Any) -> None:
            pass

        async def async_start(self) -> None:
            pass

        def async_search(self) -> None:
            pass

        def async_stop(self) -> None:
            pass

    monkeypatch.setattr(upnp, "SsdpSearchListener", Silent)
    m = upnp.UpnpMapper(GATEWAY, search_seconds=1)
    with pytest.raises(PortMapUnavailable, match="no UPnP gateway answered"):
        await m.map("udp", 41641)
    assert not m.answered
