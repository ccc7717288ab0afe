// Command cloudevents-nats is the official CloudEvents SDK for Go
// (github.com/cloudevents/sdk-go) as an outside client of projector over
// NATS JetStream, for the tests in tests/all/cloudevents_sdk.rs.
//
//	cloudevents-nats send URL STREAM SUBJECT < events.jsonl
//
// reads CloudEvents in the JSON format, one per line, and publishes them to
// SUBJECT with the SDK's JetStream sender, alternately in binary mode
// (attributes in ce- headers, data as the body) and in structured mode; it
// prints {"sent": [{"id": ..., "mode": ...}, ...]}.
//
//	cloudevents-nats receive URL STREAM SUBJECT COUNT
//
// subscribes to SUBJECT of STREAM from its start with the SDK's JetStream
// consumer and prints the first COUNT events it receives, one JSON object
// per line, then exits; it fails after 30 seconds without them.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"sync"
	"time"

	cejsm "github.com/cloudevents/sdk-go/protocol/nats_jetstream/v2"
	cloudevents "github.com/cloudevents/sdk-go/v2"
	"github.com/cloudevents/sdk-go/v2/binding"
)

func main() {
	if len(os.Args) < 5 {
		fail("usage: cloudevents-nats send URL STREAM SUBJECT < events.jsonl | receive URL STREAM SUBJECT COUNT")
	}
	url, stream, subject := os.Args[2], os.Args[3], os.Args[4]
	switch os.Args[1] {
	case "send":
		send(url, stream, subject)
	case "receive":
		if len(os.Args) != 6 {
			fail("usage: cloudevents-nats receive URL STREAM SUBJECT COUNT")
		}
		count, err := strconv.Atoi(os.Args[5])
		if err != nil || count < 1 {
			fail(fmt.Sprintf("COUNT must be a positive number, not %q", os.Args[5]))
		}
		receive(url, stream, subject, count)
	default:
		fail(fmt.Sprintf("unknown command %q: send or receive", os.Args[1]))
	}
}

type sent struct {
	ID   string `json:"id"`
	Mode string `json:"mode"`
}

func send(url, stream, subject string) {
	sender, err := cejsm.NewSender(url, stream, subject, nil, nil)
	if err != nil {
		fail(fmt.Sprintf("cannot open a sender to %s on %s: %v", subject, url, err))
	}
	defer sender.Close(context.Background())
	client, err := cloudevents.NewClient(sender)
	if err != nil {
		fail(err.Error())
	}
	report := struct {
		Sent []sent `json:"sent"`
	}{Sent: []sent{}}
	lines := bufio.NewScanner(os.Stdin)
	lines.Buffer(make([]byte, 1<<20), 1<<24)
	for number := 1; lines.Scan(); number++ {
		event := cloudevents.NewEvent()
		if err := json.Unmarshal(lines.Bytes(), &event); err != nil {
			fail(fmt.Sprintf("line %d: not a CloudEvent: %v", number, err))
		}
		ctx, mode := binding.WithForceBinary(context.Background()), "binary"
		if number%2 == 0 {
			ctx, mode = binding.WithForceStructured(context.Background()), "structured"
		}
		if result := client.Send(ctx, event); cloudevents.IsUndelivered(result) {
			fail(fmt.Sprintf("line %d (%s): not delivered: %v", number, event.ID(), result))
		}
		report.Sent = append(report.Sent, sent{ID: event.ID(), Mode: mode})
	}
	if err := lines.Err(); err != nil {
		fail(err.Error())
	}
	out, _ := json.Marshal(report)
	fmt.Println(string(out))
}

func receive(url, stream, subject string, count int) {
	consumer, err := cejsm.NewConsumer(url, stream, subject, nil, nil, nil)
	if err != nil {
		fail(fmt.Sprintf("cannot subscribe to %s of %s on %s: %v", subject, stream, url, err))
	}
	defer consumer.Close(context.Background())
	client, err := cloudevents.NewClient(consumer)
	if err != nil {
		fail(err.Error())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var mu sync.Mutex
	var received []cloudevents.Event
	err = client.StartReceiver(ctx, func(event cloudevents.Event) {
		mu.Lock()
		defer mu.Unlock()
		if len(received) < count {
			received = append(received, event)
		}
		if len(received) == count {
			cancel()
		}
	})
	if err != nil && ctx.Err() == nil {
		fail(err.Error())
	}
	mu.Lock()
	defer mu.Unlock()
	if len(received) < count {
		fail(fmt.Sprintf("received %d events of %d on %s within 30 s", len(received), count, subject))
	}
	for _, event := range received {
		out, err := json.Marshal(event)
		if err != nil {
			fail(err.Error())
		}
		fmt.Println(string(out))
	}
}

func fail(message string) {
	fmt.Fprintln(os.Stderr, "cloudevents-nats:", message)
	os.Exit(1)
}
