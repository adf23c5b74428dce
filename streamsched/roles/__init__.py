"""The processes a task passes through: ``master``, ``regional``, ``worker`` and
``projector``, with what they share: settling upstream messages after their downstream
publishes (``settle``), SCHED batches (``sched_batches``), handler threads (``threads``),
running roles as a service (``service``) and rebuilding the state view (``rebuild``)."""
