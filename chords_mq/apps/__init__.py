"""The applications on top of the library: they start daemons, load models and talk to users.

``cli`` (the ``chords`` command) with its parts: ``options`` (the click option blocks),
``requests`` (a request from options, the broker's keys and reachability, running the engine),
``streaming`` (one stream of hits to the terminal and to disk, for ``generate`` and ``run``) and
``plan_report`` (``chords plan``'s report); ``runner`` (``chords run``), ``cluster``
(``LocalCluster``: a broker and workers as local processes), ``pipeline`` (``ChordsPipeline``: a
diffusers-style pipeline in one call, on a private ``LocalCluster``; ``pipeline_call``: its
arguments and output) and ``bench`` (``chords bench``).
The library part of ``chords_mq`` (plans, solvers, wire, client) never imports this package, the
broker or the workers (``tests/test_purity.py``).
"""
