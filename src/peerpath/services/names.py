"""Names for peers: what a user may type wherever an address is accepted.

For now a name is a local petname: the note given to a peer at ``trust add`` (``peerpath
trust add ADDR planner``), matched exactly (case aside). An address is always an address.
"""

from __future__ import annotations

from peerpath import errors
from peerpath.identity import ADDRESS_PREFIX, Address, AddressError
from peerpath.node.trust import TrustStore


class UnknownNameError(errors.LocalError):
    """A name that stands for no peer (or for more than one)."""


class Names:
    """Resolves what users type into addresses: an address as it is, a petname from the trust store."""

    def __init__(self, trust: TrustStore) -> None:
        self.trust = trust

    def petname(self, address: Address) -> str:
        """The note this node gave ``address`` when trusting it ("" if none)."""
        for entry in self.trust.entries():
            if entry.address == address:
                return entry.note
        return ""

    async def resolve(self, text: Address | str) -> Address:
        """The address ``text`` stands for; UnknownNameError if it stands for none."""
        if isinstance(text, Address):
            return text
        text = text.strip()
        try:
            return Address.parse(text)
        except AddressError as exc:
            if text.lower().startswith(ADDRESS_PREFIX + "1") and len(text) > 20:
                raise  # a mistyped address: say what is wrong with it
            failure = exc
        wanted = text.casefold()
        matches = [entry.address for entry in self.trust.entries() if entry.note.strip().casefold() == wanted]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            listed = ", ".join(str(m) for m in matches)
            raise UnknownNameError(f"{text!r} is the note of {len(matches)} trusted peers ({listed}); use an address")
        raise UnknownNameError(f"{text!r} is neither an address nor the name of a trusted peer") from failure
