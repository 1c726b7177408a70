"""Quick throughput of the client against a running server (not a test, not part of the package):

    python client/measure.py URL publish [N]      # a Publisher fed one message per publish()
    python client/measure.py URL consume [N] [--max-outstanding M]
                                                  # a Subscriber with a no-op handler, on N
                                                  # messages published beforehand

On a shared machine, run it under `flock /work/scratch/bench.lock`, alternately with
`python -m bench consume_ack --url URL --duration 5 --prefill 150000` for the yardstick.
"""

import argparse
import itertools
import resource
import time
import uuid

from pubsub_client import Client, Publisher, Subscriber


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure_publish(client: Client, topic: str, count: int) -> None:
    client.create_subscription(f"{topic}-s", topic)
    publisher = Publisher(client, topic)
    started = time.monotonic()
    futures = [publisher.publish({"n": n, "kind": "order"}) for n in range(count)]
    publisher.close()
    elapsed = time.monotonic() - started
    assert all(f.result() for f in futures)
    assert client.metrics(f"{topic}-s")["available"] == count
    print(f"publisher: {count} messages in {elapsed:.2f}s = {count / elapsed:,.0f} msg/s")


def measure_consume(client: Client, topic: str, count: int, max_outstanding: int | None) -> None:
    subscription = f"{topic}-s"
    client.create_subscription(subscription, topic)
    payloads = [{"n": n, "kind": "order"} for n in range(1000)]
    for _ in range(count // 1000):
        client.publish(topic, payloads)
    count = count // 1000 * 1000
    handled = itertools.count()
    options = {} if max_outstanding is None else {"max_outstanding": max_outstanding}
    cpu = cpu_seconds()
    started = time.monotonic()
    subscriber = Subscriber(client, subscription, lambda m, tick=handled.__next__: tick(), **options).start()
    marks = []
    done = 0
    while done < count and time.monotonic() - started < 60:
        time.sleep(0.5)
        done = next(handled) - len(marks)  # minus this loop's own ticks
        marks.append((time.monotonic(), done))
    subscriber.stop()
    cpu = cpu_seconds() - cpu
    # The steady rate: from 1 s in to 90% done (start-up and the tail left out).
    t0, d0 = next((m for m in marks if m[0] - started >= 1.0), marks[0])
    t1, d1 = next((m for m in marks if m[1] >= 0.9 * count), marks[-1])
    steady = (d1 - d0) / (t1 - t0) if t1 > t0 else done / (marks[-1][0] - started)  # a short run
    print(
        f"subscriber {options or 'defaults'}: {done} handled; steady {steady:,.0f} msg/s;"
        f" client CPU {cpu / max(done, 1) * 1e6:.1f} µs/msg"
    )
    print("metrics", client.metrics(subscription))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url")
    parser.add_argument("mode", choices=["publish", "consume"])
    parser.add_argument("count", type=int, nargs="?", default=150_000)
    parser.add_argument("--max-outstanding", type=int)
    args = parser.parse_args()
    with Client(args.url) as client:
        topic = f"measure-{uuid.uuid4().hex[:8]}"
        client.create_topic(topic)
        try:
            if args.mode == "publish":
                measure_publish(client, topic, args.count)
            else:
                measure_consume(client, topic, args.count, args.max_outstanding)
        finally:
            client.delete_topic(topic)


if __name__ == "__main__":
    main()
