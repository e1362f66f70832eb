"""NovaCron settings, split by topic. ``main`` composes them; ``test`` adds the test defaults first."""
