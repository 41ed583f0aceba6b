"""HTTP: the JSON API over the same hub calls as the Socket.IO handlers (api.py), and the
TestExecution page (page.py: the built shell and assets of server/web/ and their headers).

Guarantee: the same state machine, validation and error codes as the Socket.IO events."""
