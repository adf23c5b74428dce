"""The event log: lifecycle events (``events``), recording them (``recorder``), reading
them back (``reader``), folding them into task state (``state``), and the tools over
TASKS and DLQ (``replay``, ``dlq``). Imports the transport and the vocabulary, never a role."""
