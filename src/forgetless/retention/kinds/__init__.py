"""Task kinds: each module defines its options (a pydantic model) and `run(task, ctx) -> TaskResult`."""
