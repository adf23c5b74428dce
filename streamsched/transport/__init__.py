"""NATS underneath every role: the connection and its publish path (``bus``, ``wire``),
continuous pull with credit (``pull``), reading a stream back (``reading``), the stream
definitions (``streams``) and the embedded server (``server``). Imports only the
vocabulary modules of :mod:`streamsched`."""
