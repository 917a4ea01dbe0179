"""What the runtime relies on in faust-streaming, mode, aiokafka and confluent-kafka, and the
versions it was checked against: the one place that names it (a test per item,
``tests/streams/test_runtime_pins.py``, fails loudly when a pinned version changes).

The runtime overrides no private Faust or aiokafka internals. It relies on these public parts:

* ``faust.App`` with a ``BootStrategy`` subclass whose ``enable_kafka_consumer``,
  ``enable_kafka_producer`` and ``enable_web`` are ``False`` (faust/app/base.py documents the
  switches): the worker starts no Faust consumer group, producer, table recovery or web server
  (not even when ``faust worker`` is run without ``--without-web``);
* ``App.service(instance)``: a mode ``Service`` started and stopped with the app, in the order
  registered, and stopped in reverse (the ops server first, then the agents);
* the ``logging_config`` setting (a ``logging.config.dictConfig`` dict), which
  ``faust.worker.Worker`` applies instead of its own handlers (:func:`infra.logs.logging_config`);
* ``faust.worker.Worker``: command line, signals, logging (``faust -A streams.app worker``);
* ``mode.Service`` (``faust.Service``): ``on_start`` / ``on_started`` / ``on_stop``,
  ``add_future``, ``sleep``, ``crash`` (:class:`infra.lifecycle.LoopService`);
* ``aiokafka.partitioner.murmur2``: Kafka's default partitioner hash (the agents partition some
  outputs by it, as the Java client does);
* confluent-kafka: ``Consumer.consume``, ``subscribe(on_assign=, on_revoke=, on_lost=)`` with
  ``assign()`` of explicit offsets inside ``on_assign``, ``pause``/``resume``/``seek``,
  ``commit(offsets=, asynchronous=False)``; ``Producer.produce``/``flush`` with a per-config
  ``on_delivery`` callback.
"""

from __future__ import annotations

from importlib.metadata import version

#: The versions the runtime was verified with (``pyproject.toml`` pins the same).
PINNED = {
    "faust-streaming": "0.15.3",
    "mode-streaming": "0.7.1",
    "aiokafka": "0.14.0",
    "confluent-kafka": "2.16.1",
}


def installed() -> dict[str, str]:
    """The installed version of each pinned distribution."""
    return {name: version(name) for name in PINNED}


def mismatches() -> dict[str, tuple[str, str]]:
    """``{name: (pinned, installed)}`` for every distribution whose version differs."""
    return {name: (want, got) for name, want in PINNED.items() if (got := version(name)) != want}


__all__ = ["PINNED", "installed", "mismatches"]
