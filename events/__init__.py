"""The event model in code: schemas, Confluent-framed Avro serialisation, CloudEvents headers,
the schema-registry client and the embedded registry, the topic catalogue, producers, importers."""
