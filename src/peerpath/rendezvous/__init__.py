"""The rendezvous server and its client: authenticated registration, presence, lookup,
and the relay that forwards end-to-end encrypted session datagrams between agents."""
