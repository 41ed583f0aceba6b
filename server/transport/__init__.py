"""Engine.IO under python-socketio: which sockets a node runs, and the WebSocket protocol under them.

Two implementations side by side, as uvicorn keeps its protocols: stock.py (python-engineio and
uvicorn as shipped) and lean.py with wsprotocol.py (less memory and CPU per client, on library
internals). auto.py picks one once per process; internals.py lists every private name of a library
that testpulse touches, and the check that each is still there.

Guarantee: both speak Engine.IO v4 unchanged, long-polling included; a client cannot tell them apart."""
