"""The busagents flight assistant: a plugin distribution of agents."""
