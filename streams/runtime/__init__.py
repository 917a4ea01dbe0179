"""The stream runtime every agent of ``backbeat worker`` runs on (``docs/runtime.md``): the batch
agent contract (:mod:`streams.runtime.agent`), per-partition state on changelog topics, the
checkpoint order and the read-back of published outputs; the only code that knows Faust, mode and
librdkafka. The package itself exports nothing: import its modules."""
