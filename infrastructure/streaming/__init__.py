"""Distributed projections: the outbox relay's wire format and the faust workers.

``envelope`` is the versioned message format on the ``daybook.events`` topic, ``broker``
holds the Kafka settings both sides share, ``worker`` applies the projection definitions to
the read models in batches, ``app`` wraps that in a faust-streaming app, and ``cli`` adds
``daybook relay``, ``daybook worker`` and ``daybook stream status``. The relay itself lives
in ``infrastructure.relay``.
"""
