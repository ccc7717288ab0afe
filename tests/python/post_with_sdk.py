"""Posts CloudEvents to a running projector with the official CloudEvents SDK
for Python (PyPI `cloudevents`), over HTTP in both content modes: binary
(`ce-` headers, the body is the data) and structured (the whole event as
JSON). Prints, as one JSON line, the events it sent and the status of each
answer, for the test that runs it to check what landed.

Usage: post_with_sdk.py BASE_URL STREAM COUNT
"""

import json
import sys
import urllib.request

from cloudevents.core.bindings.http import to_binary, to_structured
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent


def post(url: str, headers: dict, body: bytes) -> int:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request) as answer:
        return answer.status


def main() -> None:
    base, stream, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    url = f"{base}/streams/{stream}/events"
    sent, statuses = [], []
    for i in range(count):
        mode = "binary" if i % 2 == 0 else "structured"
        attributes = {
            "id": f"sdk-{mode}-{i}",
            "source": "https://example.com/python-sdk",
            "type": "wallet_updated",
            "subject": f"user-{i % 7}",
            "datacontenttype": "application/json",
            "correlationid": f"corr-{i}",
        }
        data = {"user_id": f"user-{i % 7}", "wallet_address": f"0x{i:04x}", "created_at": f"t{i}", "note": "café ✓"}
        event = CloudEvent(attributes, data)
        convert = to_binary if mode == "binary" else to_structured
        message = convert(event, JSONFormat())
        statuses.append(post(url, message.headers, message.body))
        sent.append({"mode": mode, "id": attributes["id"], "source": attributes["source"],
                     "type": attributes["type"], "subject": attributes["subject"],
                     "correlationid": attributes["correlationid"], "data": data})
    print(json.dumps({"statuses": statuses, "sent": sent}))


if __name__ == "__main__":
    main()
