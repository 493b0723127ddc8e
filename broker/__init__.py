"""The chords-mq broker daemon: asyncio actors around one event loop (see docs/architecture.md)."""
