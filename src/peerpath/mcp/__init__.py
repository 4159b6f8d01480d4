"""MCP (the Model Context Protocol): the overlay as tools an AI agent can use.

``peerpath mcp`` is an MCP server over standard input and output, built with the official SDK
(:mod:`~peerpath.mcp.server`): its tools list the trusted peers, send and read messages, give
tasks to peers, publish events and call peers' HTTP services. It holds no node of its own: it
is a client of the running daemon's control socket (:mod:`~peerpath.mcp.daemon`), as the CLI
is, and says so in each tool's answer when no node is running. HTTP goes over a stream the
daemon opens to the peer's service (:mod:`~peerpath.mcp.web`).

The other way round needs nothing here: a stdio MCP server exposed with ``peerpath expose
--exec NAME -- COMMAND`` (:mod:`peerpath.tunnels.exec`) is reached by any MCP client that runs
``peerpath connect PEER:NAME``.

Inside this package, ``mcp`` is the SDK (absolute imports), never this package.
"""
