"""Produces CloudEvents to a Kafka topic with the official CloudEvents SDK for
Python (PyPI `cloudevents`, its Kafka binding) and Confluent's Kafka client
(PyPI `confluent-kafka`), in both content modes: binary (`ce_` headers, the
value is the data) and structured (the whole event as JSON, content-type
application/cloudevents+json). Every event carries a `partitionkey`, which
the binding makes the record key. Prints, as one JSON line, the events it
sent with the partition and offset Kafka stored each at, for the test that
runs it to check what a projection read.

Usage: produce_kafka_with_sdk.py BOOTSTRAP_SERVERS TOPIC COUNT
"""

import json
import sys

from cloudevents.core.bindings.kafka import to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from confluent_kafka import Producer


def main() -> None:
    servers, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    producer = Producer({"bootstrap.servers": servers, "enable.idempotence": True, "acks": "all"})
    sent, failed = [], []

    def delivered_at(i):
        def report(err, message):
            if err is not None:
                failed.append(f"{sent[i]['id']}: {err}")
            else:
                sent[i]["partition"], sent[i]["offset"] = message.partition(), message.offset()
        return report

    for i in range(count):
        mode = "binary" if i % 2 == 0 else "structured"
        attributes = {
            "id": f"sdk-kafka-{mode}-{i}",
            "source": "https://example.com/python-sdk",
            "type": "wallet_updated",
            "subject": f"user-{i % 7}",
            "datacontenttype": "application/json",
            "correlationid": f"corr-{i}",
            "partitionkey": f"account-{i % 3}",
        }
        data = {"user_id": f"user-{i % 7}", "wallet_address": f"0x{i:04x}", "created_at": f"t{i}", "note": "café ✓"}
        event = CloudEvent(attributes, data)
        convert = to_binary if mode == "binary" else to_structured
        message = convert(event, JSONFormat())
        # Callbacks run in flush(), once every event is in `sent`.
        producer.produce(
            topic,
            value=message.value,
            key=message.key,
            headers=list(message.headers.items()),
            on_delivery=delivered_at(i),
        )
        sent.append({"mode": mode, "id": attributes["id"], "source": attributes["source"],
                     "type": attributes["type"], "subject": attributes["subject"],
                     "correlationid": attributes["correlationid"], "partitionkey": attributes["partitionkey"],
                     "key": message.key if isinstance(message.key, str) else message.key.decode(),
                     "data": data})

    left = producer.flush(30)
    if left or failed:
        sys.exit(f"{left} events not confirmed; refused: {failed}")
    print(json.dumps({"sent": sent}))


if __name__ == "__main__":
    main()
