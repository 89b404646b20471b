"""Swarms: many agents as supervised OS processes, the static graph they form, and its AsyncAPI."""

from .config import AgentSpec, SwarmConfig, load_swarm
from .graph import Graph, GraphProblem
from .supervisor import Supervisor

__all__ = ["AgentSpec", "Graph", "GraphProblem", "Supervisor", "SwarmConfig", "load_swarm"]
