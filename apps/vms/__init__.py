"""VMs, nodes, images, quotas and batch operations: the fleet's inventory and its API."""
