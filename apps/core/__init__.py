"""Cross-cutting pieces of the control plane: errors, pagination, settings access, accounts and quotas."""
