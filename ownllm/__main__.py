"""`python -m ownllm` is the `ownllm` command."""

from ownllm.cli import main

main()
