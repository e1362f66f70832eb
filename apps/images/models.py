"""Which node holds which stored image: the control plane's view of the nodes' image caches.

A row exists while a node fetches or holds an image; ``ready`` rows are what the scheduler of
fetches picks sources from (peers before the store). Nodes report what they hold at start and after
each fetch or eviction, and the rows follow; a row is never the only proof: a node that lacks an
image it was thought to hold says so at create time and the fetch starts again.
"""

from django.db import models


class NodeImageState(models.TextChoices):
    FETCHING = "fetching", "Fetching"
    READY = "ready", "Ready"
    FAILED = "failed", "Fetch failed"


class NodeImage(models.Model):
    node = models.ForeignKey("vms.Node", on_delete=models.CASCADE, related_name="images")
    image = models.ForeignKey("vms.Image", on_delete=models.CASCADE, related_name="nodes")
    state = models.CharField(max_length=10, choices=NodeImageState.choices)
    source = models.CharField(max_length=63, blank=True, help_text="The node (or 'store') it came from.")
    reason = models.CharField(max_length=500, blank=True)
    fetch_id = models.UUIDField(null=True, blank=True, help_text="The fetch under way (reports name it).")
    tried = models.JSONField(default=list, blank=True, help_text="Sources this fetch tried, in order.")
    percent = models.FloatField(default=0.0, help_text="How far the fetch under way is.")
    started_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "node_images"
        constraints = [models.UniqueConstraint(fields=["node", "image"], name="node_image_unique")]

    def __str__(self) -> str:
        return f"{self.image_id}@{self.node_id}: {self.state}"
