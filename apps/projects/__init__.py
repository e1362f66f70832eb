"""Projects: who owns VMs, batches and migrations, who may act on them (roles), and their quotas."""
