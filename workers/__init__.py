"""The chords-mq worker daemon and its model adapters (see docs/architecture.md)."""
