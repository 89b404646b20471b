pytest_plugins = ["busagents.testing", "busagents.llm.testing"]
