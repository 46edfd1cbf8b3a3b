"""Distributed projections: the outbox relay, its wire format and the faust workers.

``relay`` publishes the event log to Kafka, ``envelope`` is the versioned message format on
the ``daybook.events`` topic, ``broker`` holds the Kafka settings both sides share,
``worker`` applies the projection definitions to the read models in batches, ``app`` wraps
that in a faust-streaming app, and ``cli`` adds ``daybook relay``, ``daybook worker`` and
``daybook stream status``. What they need of faust's and aiokafka's private internals is in
``infrastructure.compat``.
"""
