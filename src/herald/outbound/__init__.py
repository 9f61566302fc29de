"""The outbound path: from a committed change to the devices (docs/architecture.md, "Outbound").

    dispatcher.py   reads the outbox, publishes each change to the broker, queues its pushes
    targets.py      which push channels a change goes to, and what each is sent (pure)
    streams.py      live streams: register, replay, forward, keep alive, close (no ASGI here)
    pusher.py       the push engine: one lane per provider, the retry policy
    settler.py      records push outcomes in batches
    providers/      one module per push service, registered in one table

The broker (`herald.broker`) carries changes from the dispatcher to the streams; `api/stream.py`
is the HTTP side of a stream (its handshake and the WebSocket/SSE writers).
"""
