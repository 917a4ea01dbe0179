"""The Avro schemas of every backbeat event, one ``.avsc`` file per event type, grouped by
bounded context (``schemas/playback/ListenRecorded.avsc``).

Data, not code: this file only makes the folder a package, so the schemas ship in the wheel and
are found with ``importlib.resources`` (:mod:`infra.resources`) wherever backbeat is installed.
"""
