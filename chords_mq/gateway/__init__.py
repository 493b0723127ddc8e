"""chords-gateway: an OpenAI-compatible HTTP front door to a chords-broker.

An ASGI application (Starlette on uvicorn) that holds one ``AsyncClient`` for its lifetime and
speaks to the broker only through it: ``/v1/images/generations`` (each core's hit streamed as a
partial image), ``/v1/models``, ``/v1/videos`` jobs, ``/healthz`` and ``/metrics``.
"""
