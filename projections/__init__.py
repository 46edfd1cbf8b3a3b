"""Read-model definitions: how each event changes rows. Pure; runner-agnostic."""
