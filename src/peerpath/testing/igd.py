"""A UPnP Internet Gateway Device for lab routers (IGD:1: InternetGatewayDevice, WANDevice,
WANConnectionDevice, WANIPConnection), the way a home router offers it: SSDP on the LAN,
a device description and SOAP control over HTTP (async-upnp-client's server side). Port
mappings become real nftables rules through :mod:`peerpath.testing.pcpd`'s mapping table,
so a router can offer UPnP alone or beside PCP and NAT-PMP. For tests; it trusts its LAN
entirely (it maps a port to whichever internal client a request names).

    python -m peerpath.testing.igd --wan-ip 198.51.100.5 --lan-ip 10.3.0.1 [--http-port 5000]
"""

# No "from __future__ import annotations": the server checks the action methods' argument
# annotations against the state variables' Python types at run time.
import argparse
import asyncio
import uuid
import xml.etree.ElementTree as ET
from types import MappingProxyType
from typing import Any

from async_upnp_client.client import UpnpStateVariable
from async_upnp_client.const import DeviceInfo, ServiceInfo
from async_upnp_client.exceptions import UpnpActionError, UpnpActionErrorCode
from async_upnp_client.server import UpnpServer, UpnpServerDevice, UpnpServerService, callable_action, create_state_var

from peerpath.testing.pcpd import MAX_LIFETIME, PortMapServer, nft_rules


class _Router:
    """What the service works on: the mapping table and the WAN address (set by serve())."""

    table: PortMapServer | None = None
    wan_ip = ""


ROUTER = _Router()
#: UPnP errors of WANIPConnection:1 (2.4.16).
CONFLICT_IN_MAPPING_ENTRY = 718
NO_SUCH_ENTRY = 714


def _fault(code: int, description: str) -> UpnpActionError:
    return UpnpActionError(error_code=code, error_desc=description)


def _table() -> PortMapServer:
    if ROUTER.table is None:
        raise _fault(UpnpActionErrorCode.ACTION_FAILED, "not ready")
    return ROUTER.table


class WanIpConnection(UpnpServerService):
    """WANIPConnection:1, the port-mapping part of it."""

    SERVICE_DEFINITION = ServiceInfo(
        service_id="urn:upnp-org:serviceId:WANIPConn1",
        service_type="urn:schemas-upnp-org:service:WANIPConnection:1",
        control_url="/ctl/IPConn",
        event_sub_url="/evt/IPConn",
        scpd_url="/WANIPCn.xml",
        xml=ET.Element("server_service"),
    )
    STATE_VARIABLE_DEFINITIONS = MappingProxyType(
        {
            "ExternalIPAddress": create_state_var("string"),
            "RemoteHost": create_state_var("string"),
            "ExternalPort": create_state_var("ui2"),
            "PortMappingProtocol": create_state_var("string", allowed=["TCP", "UDP"]),
            "InternalPort": create_state_var("ui2"),
            "InternalClient": create_state_var("string"),
            "PortMappingEnabled": create_state_var("boolean"),
            "PortMappingDescription": create_state_var("string"),
            "PortMappingLeaseDuration": create_state_var("ui4"),
        }
    )

    @callable_action(name="GetExternalIPAddress", in_args={}, out_args={"NewExternalIPAddress": "ExternalIPAddress"})
    async def get_external_ip_address(self) -> dict[str, UpnpStateVariable[Any]]:
        """The router's WAN address."""
        var = self.state_variable("ExternalIPAddress")
        var.value = ROUTER.wan_ip
        return {"NewExternalIPAddress": var}

    @callable_action(
        name="AddPortMapping",
        in_args={
            "NewRemoteHost": "RemoteHost",
            "NewExternalPort": "ExternalPort",
            "NewProtocol": "PortMappingProtocol",
            "NewInternalPort": "InternalPort",
            "NewInternalClient": "InternalClient",
            "NewEnabled": "PortMappingEnabled",
            "NewPortMappingDescription": "PortMappingDescription",
            "NewLeaseDuration": "PortMappingLeaseDuration",
        },
        out_args={},
    )
    async def add_port_mapping(
        self,
        NewRemoteHost: str,
        NewExternalPort: int,
        NewProtocol: str,
        NewInternalPort: int,
        NewInternalClient: str,
        NewEnabled: bool,
        NewPortMappingDescription: str,
        NewLeaseDuration: int,
    ) -> dict[str, Any]:
        """Forward the external port to the client (exactly that port, or a conflict)."""
        table = _table()
        table.expire()
        protocol = NewProtocol.lower()
        if NewExternalPort < 1024 or NewInternalPort == 0:
            raise _fault(UpnpActionErrorCode.ARGUMENT_VALUE_INVALID, "port out of range")
        if table.holder(protocol, NewExternalPort) not in (None, (NewInternalClient, NewInternalPort)):
            raise _fault(CONFLICT_IN_MAPPING_ENTRY, "ConflictInMappingEntry")
        lifetime = min(NewLeaseDuration or MAX_LIFETIME, MAX_LIFETIME)
        table.map_exactly(protocol, NewInternalClient, NewInternalPort, NewExternalPort, lifetime)
        return {}

    @callable_action(
        name="DeletePortMapping",
        in_args={
            "NewRemoteHost": "RemoteHost",
            "NewExternalPort": "ExternalPort",
            "NewProtocol": "PortMappingProtocol",
        },
        out_args={},
    )
    async def delete_port_mapping(
        self,
        NewRemoteHost: str,
        NewExternalPort: int,
        NewProtocol: str,
    ) -> dict[str, Any]:
        """Stop forwarding the external port."""
        table = _table()
        holder = table.holder(NewProtocol.lower(), NewExternalPort)
        if holder is None:
            raise _fault(NO_SUCH_ENTRY, "NoSuchEntryInArray")
        table.unmap(NewProtocol.lower(), *holder)
        return {}


def _device_info(device_type: str, name: str, udn: str) -> DeviceInfo:
    return DeviceInfo(
        device_type=device_type,
        friendly_name=name,
        manufacturer="peerpath lab",
        manufacturer_url=None,
        model_description=None,
        model_name=name,
        model_number=None,
        model_url=None,
        serial_number=None,
        udn=udn,
        upc=None,
        presentation_url=None,
        url="/rootDesc.xml",
        icons=[],
        xml=ET.Element("server_device"),
    )


class WanConnectionDevice(UpnpServerDevice):
    """WANConnectionDevice:1, holding WANIPConnection."""

    DEVICE_DEFINITION = _device_info(
        "urn:schemas-upnp-org:device:WANConnectionDevice:1", "WAN connection", f"uuid:{uuid.uuid4()}"
    )
    EMBEDDED_DEVICES = ()
    SERVICES = (WanIpConnection,)


class WanDevice(UpnpServerDevice):
    """WANDevice:1."""

    DEVICE_DEFINITION = _device_info("urn:schemas-upnp-org:device:WANDevice:1", "WAN", f"uuid:{uuid.uuid4()}")
    EMBEDDED_DEVICES = (WanConnectionDevice,)
    SERVICES = ()


class Gateway(UpnpServerDevice):
    """InternetGatewayDevice:1, the root."""

    DEVICE_DEFINITION = _device_info(
        "urn:schemas-upnp-org:device:InternetGatewayDevice:1", "peerpath lab router", f"uuid:{uuid.uuid4()}"
    )
    EMBEDDED_DEVICES = (WanDevice,)
    SERVICES = ()


async def serve(wan_ip: str, lan_ip: str, http_port: int, table: PortMapServer | None = None) -> None:
    """Serve until killed."""
    install, remove = nft_rules(wan_ip)
    ROUTER.table = table or PortMapServer(wan_ip, install, remove, protocols=frozenset())
    ROUTER.wan_ip = wan_ip
    server = UpnpServer(Gateway, (lan_ip, 0), http_port=http_port)
    await server.async_start()
    print(f"UPnP IGD on {lan_ip}:{http_port}", flush=True)
    try:
        while True:
            await asyncio.sleep(1.0)
            ROUTER.table.expire()
    finally:
        await server.async_stop()


def main() -> None:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wan-ip", required=True)
    parser.add_argument("--lan-ip", required=True)
    parser.add_argument("--http-port", type=int, default=5000)
    args = parser.parse_args()
    asyncio.run(serve(args.wan_ip, args.lan_ip, args.http_port))


if __name__ == "__main__":
    main()
