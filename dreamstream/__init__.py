"""The ``dreamstream`` command: the top layer, above the server and the clients.

The project's layers import downward only (``tests/test_layers.py`` enforces it)::

    protocol  ←  pipeline  ←  server        (the server side: torch, FastAPI, uvicorn)
    protocol  ←  clients                     (the client side: no torch, no web server)
    dreamstream (this package): the command line, may reach every layer, lazily

``pip install dreamstream`` installs the protocol and the clients; ``dreamstream[server]`` adds
what the pipeline and the server need.
"""
