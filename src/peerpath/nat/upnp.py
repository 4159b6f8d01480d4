"""Port mapping through a UPnP Internet Gateway Device (IGD:1 and IGD:2, WANIPConnection or
WANPPPConnection), for routers that speak neither PCP nor NAT-PMP.

Discovery (SSDP), the device description and the SOAP calls are async-upnp-client's; this
module decides what to ask for and trusts only the default gateway: an SSDP answer whose
description lives on any other host is ignored, so nobody else on the LAN can pose as the
router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
from typing import Any
from urllib.parse import urlparse

from async_upnp_client.aiohttp import AiohttpRequester
from async_upnp_client.client import UpnpDevice, UpnpService
from async_upnp_client.client_factory import UpnpFactory
from async_upnp_client.exceptions import UpnpActionError, UpnpError
from async_upnp_client.search import SsdpSearchListener

from peerpath.nat.portmap import LIFETIME, Mapping, PortMapUnavailable, clock

log = logging.getLogger(__name__)

#: What to search for (an IGD:2 device answers a search for IGD:1 too, UDA 1.1 1.3.2).
SEARCH_TARGET = "urn:schemas-upnp-org:device:InternetGatewayDevice:1"
#: The services that map ports, in order of preference.
SERVICES = (
    "urn:schemas-upnp-org:service:WANIPConnection:2",
    "urn:schemas-upnp-org:service:WANIPConnection:1",
    "urn:schemas-upnp-org:service:WANPPPConnection:1",
)
#: Seconds SSDP answers are waited for (the MX the search asks for).
SEARCH_SECONDS = 2
#: UPnP errors (IGD:1 WANIPConnection 2.4.16) that mean "try another external port" and
#: "only leases of 0 (permanent) are allowed".
CONFLICT = 718
ONLY_PERMANENT = 725
#: External ports tried before giving up (the internal port first, then random ones).
PORT_TRIES = 4
#: AddPortMapping does not say what lease the router granted (some cap it): the mapping is
#: renewed as if it lasted at most this long.
ASSUMED_LEASE = 1200


class UpnpMapper:
    """Talks to the IGD at the default gateway; the same interface as PCP's mapper."""

    method = "upnp"

    def __init__(self, gateway: str, *, local_ip: str | None = None, search_seconds: int = SEARCH_SECONDS) -> None:
        self.gateway = gateway
        self.local_ip = local_ip
        self.search_seconds = search_seconds
        self._service: UpnpService | None = None
        self._requester = AiohttpRequester(timeout=5)

    @property
    def answered(self) -> bool:
        """Whether a UPnP gateway has been found (else asking again is not worth it)."""
        return self._service is not None

    async def _find(self) -> UpnpService:
        if self._service is not None:
            return self._service
        locations: list[str] = []
        found = asyncio.Event()

        async def answered(headers: Any) -> None:
            location = str(headers.get("location") or "")
            if urlparse(location).hostname == self.gateway and location not in locations:
                locations.append(location)
                found.set()
            elif location:
                log.debug("UPnP: ignoring %s, not the gateway %s", location, self.gateway)

        listener = SsdpSearchListener(async_callback=answered, timeout=self.search_seconds, search_target=SEARCH_TARGET)
        try:
            await listener.async_start()
            listener.async_search()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(found.wait(), self.search_seconds)  # the gateway's answer ends it
        except OSError as exc:
            raise PortMapUnavailable(f"UPnP search failed: {exc}") from exc
        finally:
            listener.async_stop()
        if not locations:
            raise PortMapUnavailable(f"no UPnP gateway answered at {self.gateway}")
        factory = UpnpFactory(self._requester, non_strict=True)
        for location in locations:
            try:
                device = await factory.async_create_device(location)
            except (TimeoutError, UpnpError, OSError) as exc:
                log.debug("UPnP: %s unreadable: %s", location, exc)
                continue
            service = _port_mapping_service(device)
            if service is not None:
                self._service = service
                return service
        raise PortMapUnavailable(f"the UPnP device at {self.gateway} offers no port mapping service")

    def _local_ip(self) -> str:
        if self.local_ip is None:
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe.connect((self.gateway, 1900))
                self.local_ip = str(probe.getsockname()[0])
            finally:
                probe.close()
        return self.local_ip

    async def _call(self, service: UpnpService, action: str, **arguments: Any) -> dict[str, Any]:
        try:
            result = await service.action(action).async_call(**arguments)
        except UpnpActionError:
            raise
        except (TimeoutError, UpnpError, OSError, KeyError) as exc:
            self._service = None  # look the device up afresh next time
            raise PortMapUnavailable(f"UPnP {action} at {self.gateway} failed: {exc}") from exc
        return dict(result)

    async def map(
        self, protocol: str, internal_port: int, lifetime: int = LIFETIME, previous: Mapping | None = None
    ) -> Mapping:
        """Map (or, with ``previous``, renew) ``internal_port``."""
        service = await self._find()
        external_ip = str((await self._call(service, "GetExternalIPAddress")).get("NewExternalIPAddress") or "")
        if not external_ip:
            raise PortMapUnavailable(f"the UPnP gateway {self.gateway} has no external address")
        first = previous.external[1] if previous is not None else internal_port
        ports = [first, *random.sample(range(1024, 65536), PORT_TRIES - 1)]
        lease = lifetime
        while ports:
            port = ports[0]
            try:
                await self._call(
                    service,
                    "AddPortMapping",
                    NewRemoteHost="",
                    NewExternalPort=port,
                    NewProtocol=protocol.upper(),
                    NewInternalPort=internal_port,
                    NewInternalClient=self._local_ip(),
                    NewEnabled=True,
                    NewPortMappingDescription="peerpath",
                    NewLeaseDuration=lease,
                )
            except UpnpActionError as exc:
                if exc.error_code == ONLY_PERMANENT and lease:
                    lease = 0  # the same port for good: renewed all the same, deleted at stop
                    continue
                if exc.error_code == CONFLICT:
                    ports.pop(0)  # another host holds that external port
                    continue
                raise PortMapUnavailable(f"UPnP gateway refused: {exc.error_code} {exc.error_desc}") from exc
            granted = min(lease or lifetime, ASSUMED_LEASE)
            return Mapping(protocol, internal_port, (external_ip, port), granted, self.method, clock())
        raise PortMapUnavailable(f"UPnP gateway {self.gateway}: every external port tried is taken")

    async def unmap(self, mapping: Mapping) -> None:
        """Delete a mapping (best effort)."""
        with contextlib.suppress(PortMapUnavailable, UpnpError, OSError):
            service = await self._find()
            await self._call(
                service,
                "DeletePortMapping",
                NewRemoteHost="",
                NewExternalPort=mapping.external[1],
                NewProtocol=mapping.protocol.upper(),
            )


def _port_mapping_service(device: UpnpDevice) -> UpnpService | None:
    """The device's (or an embedded device's) port-mapping service, the best kind first."""
    services = {service.service_type: service for service in device.all_services}
    return next((services[kind] for kind in SERVICES if kind in services), None)
