"""`python -m agent run ...`: the reference agent (the same as `eucora-agent`)."""

from agent.cli import main

raise SystemExit(main(prog="python -m agent"))
