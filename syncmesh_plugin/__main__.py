"""`python -m syncmesh_plugin ...` is the same as the `syncmesh-plugin` command."""

from .cli import main

main()
