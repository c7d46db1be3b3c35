"""`python -m agent run ...`: the reference agent without the rest of the CLI."""

from cli.agent import app

app(prog_name="python -m agent")
