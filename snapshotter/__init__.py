"""snapshotter: snapshot, restore and quarantine the state of AI agents."""

__version__ = "0.1.0"
