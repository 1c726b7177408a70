"""Command line: `python -m pubsub_client --url URL publish TOPIC` (JSON objects, one per line on
stdin) and `python -m pubsub_client --url URL tail SUBSCRIPTION [--ack] [--max N]`."""

import argparse
import json
import os
import signal
import sys

from pubsub_client.client import PAGE, Client
from pubsub_client.errors import PubSubError
from pubsub_client.publisher import Publisher


def publish(client: Client, args: argparse.Namespace) -> int:
    """Publish each line of stdin (a JSON object; blank lines skipped); the count on stderr."""
    futures = []
    with Publisher(client, args.topic) as publisher:
        for number, line in enumerate(sys.stdin, 1):
            if not line.strip():
                continue
            try:
                payload = json.loads(line)
                futures.append(publisher.publish(payload))
            except (ValueError, TypeError) as error:
                print(f"line {number}: not a JSON object: {error}", file=sys.stderr)
                return 1
    failed = [f.exception() for f in futures if f.exception() is not None]
    print(f"published {len(futures) - len(failed)} messages to {args.topic}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} failed: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def interrupt(signum, frame):
    raise KeyboardInterrupt


def tail(client: Client, args: argparse.Namespace) -> int:
    """Print messages as JSON lines. With --ack each printed batch is acked; without, the
    messages are held (leased) until tail exits, then nacked with no delay, so they stay
    available (each look still counts as a delivery attempt)."""
    signal.signal(signal.SIGTERM, interrupt)  # as Ctrl-C: give back what is held
    consumer_id = f"tail-{os.getpid()}"
    printed = 0
    held: list[str] = []
    seen: set[str] = set()
    try:
        while args.max is None or printed < args.max:
            want = PAGE if args.max is None else min(PAGE, args.max - printed)
            messages = client.consume(args.subscription, consumer_id, want, args.wait_seconds)
            lines = []
            for message in messages:
                if message.id in seen:  # held so long that its lease lapsed and it came again
                    continue
                seen.add(message.id)
                lines.append(json.dumps(message.to_dict(), ensure_ascii=False))
            if lines:
                sys.stdout.write("\n".join(lines) + "\n")
                sys.stdout.flush()
                printed += len(lines)
            ack_ids = [m.ack_id for m in messages]
            if args.ack:
                client.ack(args.subscription, ack_ids)
            else:
                held.extend(ack_ids)
    except KeyboardInterrupt:
        pass
    finally:
        if held:
            client.nack(args.subscription, held, delay_seconds=0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pubsub_client", description=__doc__)
    parser.add_argument("--url", default=os.environ.get("PUBSUB_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--client-id", default=os.environ.get("PUBSUB_CLIENT_ID"))
    parser.add_argument("--client-secret", default=os.environ.get("PUBSUB_CLIENT_SECRET"))
    commands = parser.add_subparsers(dest="command", required=True)
    publish_parser = commands.add_parser("publish", help="publish JSON objects read from stdin, one per line")
    publish_parser.add_argument("topic")
    tail_parser = commands.add_parser("tail", help="print a subscription's messages as JSON lines")
    tail_parser.add_argument("subscription")
    tail_parser.add_argument("--ack", action="store_true", help="ack what is printed (default: leave it)")
    tail_parser.add_argument("--max", type=int, help="exit after this many messages")
    tail_parser.add_argument("--wait-seconds", type=int, default=20, help="long poll (0-20)")
    args = parser.parse_args(argv)
    with Client(args.url, args.client_id, args.client_secret) as client:
        try:
            return publish(client, args) if args.command == "publish" else tail(client, args)
        except PubSubError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
