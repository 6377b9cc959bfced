"""The pure optimizer: profiles, queueing model, snapshot types and the policy."""
