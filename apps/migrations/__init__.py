"""VM migrations between nodes: requests, their state machine, progress and audit trail."""
