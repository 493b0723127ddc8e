"""chords-mq: CHORDS parallel-in-time diffusion sampling, run as a ZeroMQ service.

The pure core lives in :mod:`chords_mq.algorithms` (plans) and :mod:`chords_mq.solvers`;
:mod:`chords_mq.local` drives a plan in-process. The broker and worker daemons wrap them.
"""

__version__ = "0.1.0"
