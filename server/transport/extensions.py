"""The ASGI extensions of LeanWebSocketProtocol (wsprotocol.py), advertised in scope["extensions"]:
what lean.py's sockets ask of the WebSocket under them beyond ASGI's send and receive."""

# {"type": SEND_BATCH, "messages": [str | bytes, ...]}: several WebSocket messages in one write.
SEND_BATCH = "testpulse.websocket.send_batch"
# {"type": ABORT}: drop the connection now, without a closing handshake. It is for a peer that has
# stopped reading: a close frame would wait behind everything it has not taken, for ever.
ABORT = "testpulse.websocket.abort"
# The protocol behind the ASGI `send` has write_now(messages) -> bool: writes WireMessages at once,
# without suspending (False: flow control holds writes back, nothing written).
WRITE_NOW = "testpulse.websocket.write_now"
