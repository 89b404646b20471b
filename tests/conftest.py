pytest_plugins = ["busagents.testing"]
