"""Python client of the pubsub service: Client for every REST call, Publisher for batched
publishing with futures, Subscriber for a pool of handlers with batched acks and lease extension."""

from pubsub_client.client import Client, Message
from pubsub_client.errors import (
    AuthError,
    ConflictError,
    ConnectionFailedError,
    Nack,
    NotFoundError,
    PubSubError,
    ServerError,
    ValidationError,
)
from pubsub_client.publisher import Publisher
from pubsub_client.subscriber import Subscriber

__all__ = [
    "AuthError",
    "Client",
    "ConflictError",
    "ConnectionFailedError",
    "Message",
    "Nack",
    "NotFoundError",
    "Publisher",
    "PubSubError",
    "ServerError",
    "Subscriber",
    "ValidationError",
]
